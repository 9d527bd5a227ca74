fn main() {
    if std::env::args().nth(1).as_deref() == Some(spore_sandbox::INIT_SUBCOMMAND) {
        spore_sandbox::run_init();
    }
}
