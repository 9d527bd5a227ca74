//! `spore`: the Spore CLI and daemon.
//!
//! Exit codes: 0 success; 1 error; 2 usage error; 3 the function returned an error
//! (`invoke`); 4 the daemon could not be reached.

mod cli;
mod commands;
mod config;
mod inspect;
mod out;

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
    let argv = match config::expand(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(argv);
    if !matches!(
        cli.command,
        Command::Serve(_)
            | Command::Shim(_)
            | Command::Demo(_)
            | Command::Bench { .. }
            // A deploy writes a large body to a socket the daemon may close early (it
            // refuses an oversized request from its head): that must be an error that
            // says so, not a silent death by SIGPIPE.
            | Command::Deploy { .. }
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
    spore_client::signed::set_defaults(cli.profile.clone(), None);
    out::set_json(cli.output == "json");
    let result = match cli.command {
        Command::Serve(args) => commands::serve(args, None),
        Command::Shim(args) => commands::shim(args),
        Command::Cluster { which } => commands::cluster(which),
        Command::Units => inspect::units(&cli.endpoint),
        Command::Deploy { dir, no_build } => commands::deploy(&cli.endpoint, &dir, !no_build),
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
        Command::Ls => inspect::ls(&cli.endpoint),
        Command::Ps => inspect::ps(&cli.endpoint),
        Command::Describe { name } => inspect::describe(&cli.endpoint, &name),
        Command::Completions { shell } => inspect::completions(shell),
        Command::Rm { name, force } => inspect::rm(&cli.endpoint, &name, force),
        Command::Evict { name } => commands::evict(&cli.endpoint, &name),
        Command::Logs {
            name,
            lines,
            follow,
            since,
            request_id,
        } => inspect::logs(
            &cli.endpoint,
            &name,
            lines,
            follow,
            since.as_deref(),
            request_id.as_deref(),
        ),
        Command::Dag { which } => commands::dag(&cli.endpoint, which),
        Command::Snapshot { which } => commands::snapshot(&cli.endpoint, which),
        Command::Demo(args) => {
            let ep = args.use_running_daemon.then(|| cli.endpoint.clone());
            commands::demo(ep.as_deref(), args)
        }
        Command::Bench {
            which,
            use_running_daemon,
        } => commands::bench(use_running_daemon.then_some(cli.endpoint.as_str()), which),
        Command::Keys { which } => inspect::keys(&cli.endpoint, which),
        Command::Ui { open, print_url } => inspect::ui(&cli.endpoint, open, print_url),
        Command::SandboxInit => unreachable!("handled above"),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if out::json() {
                // Programs reading -o json get the error as JSON too (kind, status, message
                // of the daemon's answer when there was one).
                let api = e
                    .chain()
                    .find_map(|c| c.downcast_ref::<spore_client::ClientError>());
                let v = match api {
                    Some(spore_client::ClientError::Api {
                        kind,
                        status,
                        message,
                    }) => {
                        serde_json::json!({ "error": { "type": kind, "status": status.as_u16(), "message": message } })
                    }
                    _ => serde_json::json!({ "error": { "message": format!("{e:#}") } }),
                };
                println!("{v}");
            }
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            let unrecognized = e.chain().any(|c| {
                c.downcast_ref::<spore_client::ClientError>().is_some_and(|c| {
                    matches!(c, spore_client::ClientError::Api { kind, .. } if kind == "UnrecognizedClientException")
                })
            });
            if unrecognized {
                eprintln!("hint: the daemon does not know this client's key (or it sent none): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, pass --profile NAME, or run as a user who can read the daemon's <data-dir>/credentials (SPORE_DATA_DIR); `spore keys create` makes keys");
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
