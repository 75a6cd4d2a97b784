//! `minivmm` command line entry point.

fn main() {
    eprintln!("minivmm: booting guests is not implemented yet (see the open boot issue)");
    std::process::exit(2);
}
