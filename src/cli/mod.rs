//! The subcommands, one module each: their flags (clap), the checks on them, and what the command
//! does. This is the top layer: it may use every other module, and none uses it. `main.rs` only
//! dispatches here and prints errors.

pub mod bench;
pub mod check;
pub mod device;
pub mod plot;
pub mod quickstart;
pub mod sample;
pub mod tokenize;
pub mod train;

/// How to run this finch binary again, for the "next:" lines commands print: `finch` when that is
/// what PATH finds, else this binary's path (relative to the current directory when under it), as
/// after `cargo run`.
pub fn finch_command() -> String {
    let Ok(exe) = std::env::current_exe() else { return "finch".into() };
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .any(|dir| std::fs::canonicalize(dir.join("finch")).ok() == std::fs::canonicalize(&exe).ok())
    });
    if on_path {
        return "finch".into();
    }
    let cwd = std::env::current_dir().unwrap_or_default();
    exe.strip_prefix(&cwd).unwrap_or(&exe).display().to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_next_command_runs_this_binary() {
        // A test binary is never `finch` on PATH: it is named by its path, which exists.
        let command = super::finch_command();
        assert_ne!(command, "finch");
        assert!(std::path::Path::new(&command).is_file(), "{command}");
    }
}
