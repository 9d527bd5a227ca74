//! `spore`: the Spore CLI and daemon.
//!
//! Exit codes: 0 success; 1 error; 2 usage error; 3 the function returned an error
//! (`invoke`); 4 the daemon could not be reached.

mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    // The sandbox init must run before anything else touches the process (no threads).
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == spore_sandbox::INIT_SUBCOMMAND)
    {
        spore_sandbox::run_init();
    }
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == spore_snapshot::RESTORE_SUBCOMMAND)
    {
        spore_snapshot::run_restorer();
    }
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Serve(_) | Command::Shim(_) | Command::Demo(_) | Command::Bench { .. }
    ) {
        // A client command whose output goes to a closed pipe (`spore snapshot inspect f |
        // head`) ends quietly, as other command-line tools do, instead of panicking.
        // SAFETY: restores the default action of one signal before any thread starts.
        let _ = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
        };
    }
    let result = match cli.command {
        Command::Serve(args) => commands::serve(args, None),
        Command::Shim(args) => commands::shim(args),
        Command::Cluster { which } => commands::cluster(which),
        Command::Units => commands::units(&cli.endpoint),
        Command::Deploy { dir } => commands::deploy(&cli.endpoint, &dir),
        Command::Invoke {
            name,
            payload,
            cold,
            log,
            verbose,
        } => commands::invoke(
            &cli.endpoint,
            &name,
            &payload,
            cold.as_deref(),
            log,
            verbose,
        ),
        Command::Ls => commands::ls(&cli.endpoint),
        Command::Rm { name } => commands::rm(&cli.endpoint, &name),
        Command::Evict { name } => commands::evict(&cli.endpoint, &name),
        Command::Logs { name, lines } => commands::logs(&cli.endpoint, &name, lines),
        Command::Dag { which } => commands::dag(&cli.endpoint, which),
        Command::Snapshot { which } => commands::snapshot(&cli.endpoint, which),
        Command::Demo(args) => commands::demo(&cli.endpoint, args),
        Command::Bench { which } => commands::bench(&cli.endpoint, which),
        Command::SandboxInit => unreachable!("handled above"),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            if e.chain().any(|c| {
                c.downcast_ref::<spore_client::ClientError>()
                    .is_some_and(spore_client::ClientError::is_unreachable)
            }) {
                ExitCode::from(4)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
