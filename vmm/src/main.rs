//! `minivmm` command line entry point: parse, run, map the outcome to an exit
//! status (table in `exit.rs` and the README). Every error is one line on stderr.

use std::process::ExitCode;

use clap::Parser;
use vmm::cli::Cli;
use vmm::run::VmConfig;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("minivmm: {}", one_line(&e.render().to_string()));
            return ExitCode::from(2);
        }
    };
    if let Err(e) = cli.check() {
        eprintln!("minivmm: {e}");
        return ExitCode::from(2);
    }
    vmm::logger::init(cli.log_level);
    let flags = cli.kernel.clone().map(|kernel| VmConfig {
        kernel,
        initrd: cli.initrd.clone(),
        cmdline: cli.cmdline().to_owned(),
        mem: cli.mem,
        cpus: cli.cpus,
        template: cli.cpu_template,
        disks: cli.disks.clone(),
        nets: cli.nets.clone(),
        acpi: cli.acpi == vmm::cli::Switch::On,
        boot_timer: cli.boot_timer,
        track_dirty_pages: cli.track_dirty_pages,
    });
    let launch = vmm::api::Launch {
        api_sock: cli.api_sock.clone(),
        config_file: cli.config_file.clone(),
        id: cli.id.clone(),
        boot_timer: cli.boot_timer,
        flags,
        restore: cli
            .restore
            .as_ref()
            .map(|dir| vmm::snapshot::restore::Params {
                track_dirty_pages: cli.track_dirty_pages,
                state_path: dir.join(vmm::snapshot::restore::STATE_FILE),
                mem_path: dir.join(vmm::snapshot::restore::MEMORY_FILE),
                shared: cli.restore_shared,
                network_overrides: cli.restore_nets.clone(),
                resume: !cli.restore_paused,
            }),
    };
    match vmm::api::launch(launch) {
        Ok(exit) => {
            if exit.status() != 0 {
                eprintln!("minivmm: {exit}");
            } else {
                log::info!("{exit}");
            }
            ExitCode::from(exit.status() as u8)
        }
        Err(e) => {
            eprintln!("minivmm: {}", vmm::error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// clap's multi-line error as one line: the message and its details, without
/// the usage and tips.
fn one_line(rendered: &str) -> String {
    let parts: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.starts_with("Usage:"))
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("tip:") && !l.starts_with("For more information")
        })
        .collect();
    match parts.join(" ").trim_start_matches("error: ") {
        "" => "invalid arguments".to_owned(),
        line => line.to_owned(),
    }
}
