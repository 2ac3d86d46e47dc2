//! Named crash points, for the crash tests.
//!
//! In a build with debug assertions (the tests' builds), [`point`] ends the process on the
//! spot, the way SIGKILL would (no destructors, no flush, no transaction committed), when
//! `SHOPVERSE_CRASH_AT` names it: `orders.after_reserve`, or `consumer.after_inbox@payments`
//! for a point reached by several components (`@` names which one). Release builds compile
//! [`point`] to nothing: they carry no crash points.

/// The exit status of a process ended at a crash point (SIGKILL's, as a shell reports it).
pub const EXIT_STATUS: i32 = 137;

/// Ends the process here if `SHOPVERSE_CRASH_AT` is `name` or `name@scope`.
#[inline(always)]
pub fn point(name: &str, scope: &str) {
    #[cfg(debug_assertions)]
    {
        static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        let Some(at) = AT.get_or_init(|| std::env::var("SHOPVERSE_CRASH_AT").ok()) else {
            return;
        };
        let (want, want_scope) = at.split_once('@').unwrap_or((at, ""));
        if want == name && (want_scope.is_empty() || want_scope == scope) {
            eprintln!("crash point {name}@{scope}: exiting with {EXIT_STATUS}");
            std::process::exit(EXIT_STATUS);
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = (name, scope);
}
