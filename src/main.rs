/// mimalloc rather than glibc's malloc: hyper allocates and frees a read buffer of several
/// KiB per request, which sent glibc into `malloc_consolidate` on every call (see
/// docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    dispatch::cli::main()
}
