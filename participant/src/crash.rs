//! Crash points, for the fault-injection tests: named places on the durable path where a
//! test can stop this process. They are compiled in only with the `failpoints` feature
//! (the `fail` crate) and inert unless `FAILPOINTS` names them:
//!
//! - `NAME=return` prints `crash point NAME: abort` to stderr and aborts the process at
//!   the point (a crash: nothing after it happens);
//! - `NAME=1*return(pause)` stops the thread at the point, prints `crash point NAME:
//!   paused` to stderr, and goes on once the file named by `RATIFY_CRASH_POINT_RESUME`
//!   exists. Meanwhile the test crashes *another* process, so each point can be run
//!   three ways: crash this process, crash a peer while this one stands at the point,
//!   or both.

/// Marks a crash point; expands to nothing without the `failpoints` feature.
macro_rules! crash_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        $crate::crash::fire($name);
    };
}

#[cfg(feature = "failpoints")]
pub(crate) fn fire(name: &str) {
    let Some(argument) = fail::eval(name, |argument| argument) else {
        return;
    };
    if argument.as_deref() != Some("pause") {
        // The marker tells a test that the process stopped here and not elsewhere.
        eprintln!("crash point {name}: abort");
        std::process::abort();
    }
    pause(name);
}

/// Stands still at the point until the test says to go on.
#[cfg(feature = "failpoints")]
pub(crate) fn pause(name: &str) {
    eprintln!("crash point {name}: paused");
    let resume = std::env::var_os("RATIFY_CRASH_POINT_RESUME").map(std::path::PathBuf::from);
    while !resume.as_ref().is_some_and(|path| path.exists()) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    eprintln!("crash point {name}: resumed");
}
