//! Failpoints at each durability step (`FAILPOINTS=name=action`).
//!
//! Actions are those of the `fail` crate (`panic`, `sleep(ms)`, `pause`,
//! counts such as `1*off->panic`), plus `return` or `return(CODE)`, which
//! exits the process at once with CODE (default 97): the `fail` crate has no
//! exit action, and a crash test needs one that does not unwind.

/// Evaluate failpoint `name`.
pub(crate) fn hit(name: &str) {
    if let Some(arg) = fail::eval(name, |arg| arg) {
        let code = arg.and_then(|a| a.trim().parse::<i32>().ok()).unwrap_or(97);
        tracing::error!(failpoint = name, code, "failpoint: exiting");
        std::process::exit(code);
    }
}
