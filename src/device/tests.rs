//! Device task tests: placeholder replaced below.
