//! The command line's conventions: shell completions and a man page generated from the clap
//! definitions, `--version` naming the git commit, and logs showing config enums as users
//! write them.

use std::process::Output;
use std::time::Duration;

use tokio::process::Command;

use crate::helpers::Binary;

const BIN: &str = env!("CARGO_BIN_EXE_telemetryhub");

/// Every subcommand, as the user types it.
const SUBCOMMANDS: [&str; 7] = [
    "validate",
    "completions",
    "man",
    "healthcheck",
    "simulate",
    "bench",
    "help",
];

async fn run(args: &[&str]) -> Output {
    let output = Command::new(BIN)
        .args(args)
        // A broken config must not matter to these: they describe the command line only.
        .env("TELEMETRYHUB_CONFIG", "/nonexistent/telemetryhub.toml")
        .output()
        .await
        .expect("the binary runs");
    assert!(output.status.success(), "{args:?}: {output:?}");
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("UTF-8 output")
}

#[tokio::test]
async fn completions_for_bash_zsh_and_fish_name_every_subcommand() {
    // How each shell's script spells the long option --config.
    for (shell, option) in [
        ("bash", "--config"),
        ("zsh", "--config"),
        ("fish", "-l config"),
    ] {
        let script = stdout(&run(&["completions", shell]).await);
        for sub in SUBCOMMANDS {
            assert!(script.contains(sub), "{shell} completion lacks {sub}");
        }
        assert!(script.contains(option), "{shell} completion lacks {option}");
    }
}

#[tokio::test]
async fn the_bash_completion_is_valid_bash() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("telemetryhub.bash");
    std::fs::write(&path, run(&["completions", "bash"]).await.stdout).expect("writable");
    let check = Command::new("bash")
        .arg("-n")
        .arg(&path)
        .output()
        .await
        .expect("bash runs");
    assert!(check.status.success(), "bash -n: {check:?}");
    // Sourcing it registers the completion function for the command.
    let source = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p telemetryhub",
            path.display()
        ))
        .output()
        .await
        .expect("bash runs");
    assert!(source.status.success(), "{source:?}");
    assert!(String::from_utf8_lossy(&source.stdout).contains("_telemetryhub"));
}

#[tokio::test]
async fn an_unknown_shell_is_refused() {
    let output = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .await
        .expect("the binary runs");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
}

#[tokio::test]
async fn the_man_page_is_roff_naming_every_subcommand_and_option() {
    let page = stdout(&run(&["man"]).await);
    assert!(page.contains(".TH telemetryhub 1"), "{page}");
    assert!(page.contains(".SH SUBCOMMANDS"), "{page}");
    for sub in SUBCOMMANDS {
        assert!(
            page.contains(&format!("telemetryhub\\-{sub}")),
            "lacks {sub}"
        );
    }
    for option in [
        "config",
        "listen",
        "log\\-format",
        "stats\\-file",
        "version",
    ] {
        assert!(
            page.contains(&format!("\\-\\-{option}")),
            "lacks --{option}"
        );
    }
    assert!(
        page.contains("TELEMETRYHUB_CONFIG"),
        "the env variable is documented"
    );
}

#[tokio::test]
async fn version_names_the_package_version_and_the_git_commit() {
    let line = stdout(&run(&["--version"]).await);
    let git = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let commit = std::env::var("TELEMETRYHUB_GIT_COMMIT")
        .ok()
        .or(git)
        .unwrap_or_else(|| "unknown".to_owned());
    let expected = format!(
        "telemetryhub {} (commit {commit})\n",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(line, expected);
}

#[tokio::test]
async fn the_start_up_log_shows_the_overflow_policy_as_configured() {
    let config = "[buffer]\noverflow = \"drop_oldest\"\n\n[[devices]]\nid = \"log0\"\n";
    let mut gateway = Binary::start(config, &[]).await;
    gateway.signal("TERM");
    let (status, stderr) = gateway.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "{status}\n{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("TelemetryHub listening."))
        .unwrap_or_else(|| panic!("no start-up line in\n{stderr}"));
    assert!(line.contains("overflow=drop_oldest"), "{line}");
    assert!(!line.contains("DropOldest"), "{line}");
}
