//! Build script: records the git commit the binary is built from, for `--version`, in the
//! `TELEMETRYHUB_GIT_COMMIT` compile-time variable.
//!
//! The commit comes from `TELEMETRYHUB_GIT_COMMIT` in the build's environment if set (a
//! packager building from a tarball), else from `git rev-parse`; with neither (a Docker build
//! context without `.git`, no git installed) it is "unknown" and the build goes on.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=TELEMETRYHUB_GIT_COMMIT");
    let commit = std::env::var("TELEMETRYHUB_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo::rustc-env=TELEMETRYHUB_GIT_COMMIT={}", commit.trim());
}

/// The short hash of HEAD, and the files whose change moves it (HEAD, the branch's ref, the
/// packed refs) registered for a rebuild; `None` outside a git checkout.
fn git_commit() -> Option<String> {
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    let mut watched = vec![git(&["rev-parse", "--git-path", "HEAD"])?];
    watched.push(git(&["rev-parse", "--git-path", "packed-refs"])?);
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(git(&["rev-parse", "--git-path", &branch])?);
    }
    // Only paths that exist: cargo reruns a build script on every build for a missing one.
    for path in watched
        .into_iter()
        .map(PathBuf::from)
        .filter(|p| p.exists())
    {
        println!("cargo::rerun-if-changed={}", path.display());
    }
    Some(commit)
}

/// `git ARGS` in the package directory: its trimmed output if it succeeded.
fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}
