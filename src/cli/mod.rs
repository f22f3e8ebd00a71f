//! The command line: parse argv, run `ls` or the mount, turn errors into one or two lines on
//! stderr and an exit status.

pub mod args;
pub mod ls;
pub mod mount;
mod mountinfo;
pub mod options;
pub mod setup;
mod signals;

use args::Command;

/// Run the program; returns the exit status.
pub fn run(argv: Vec<String>) -> i32 {
    let cmd = match args::parse(&argv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ckptfs: {e}");
            eprintln!("try 'ckptfs --help'");
            return 2;
        }
    };
    let debug = matches!(&cmd, Command::Mount { options, .. } if options.debug);
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(if debug {
            "debug"
        } else {
            "warn"
        }));
    if debug {
        logger.filter_module("ckptfs", log::LevelFilter::Debug);
    }
    let _ = logger.try_init();
    let result = match cmd {
        Command::Help => {
            println!("{}", args::USAGE);
            Ok(())
        }
        Command::Version => {
            println!("{}", args::VERSION);
            Ok(())
        }
        Command::Ls {
            json,
            checkpoints,
            image,
        } => ls::run(&image, checkpoints.as_deref(), json).map(|t| print!("{t}")),
        Command::Mount {
            image,
            mountpoint,
            options,
            foreground,
        } => mount::run(&image, &mountpoint, &options, foreground),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ckptfs: {e}");
            1
        }
    }
}
