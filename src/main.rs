fn main() {
    std::process::exit(ckptfs::cli::run(std::env::args().skip(1).collect()));
}
