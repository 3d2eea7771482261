//! The allocator keygate runs with, and its settings. A file of its own so
//! that the benches that measure memory or allocation (`benches/memory.rs`,
//! `benches/ratelimit.rs`) run with exactly what the binary runs with: they
//! include it with `#[path]`.
//!
//! mimalloc (v3) on Linux commits each arena it reserves (1 GiB) up front,
//! and then hands freed memory back by resetting it, which leaves it in the
//! process's resident set until the kernel needs it. With arenas committed
//! on demand, freed memory is decommitted instead and RSS shows what is in
//! use: with 200,000 keys cached, 156-162 MB instead of 216-241 MB
//! (BENCHMARKS.md, "Memory"). The setting must be made before the first
//! allocation creates the first arena, so it runs as an early ELF
//! constructor, before Rust's runtime starts. `MIMALLOC_ARENA_EAGER_COMMIT`
//! in the environment still decides when it is set.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array.00099")]
static COMMIT_ON_DEMAND: extern "C" fn() = commit_on_demand;

#[cfg(target_os = "linux")]
extern "C" fn commit_on_demand() {
    use std::ffi::{c_char, c_int, c_long};
    unsafe extern "C" {
        fn mi_version() -> c_int;
        fn mi_option_set(option: c_int, value: c_long);
        fn getenv(name: *const c_char) -> *mut c_char;
    }
    /// `mi_option_arena_eager_commit` in mimalloc v3's `mi_option_e`.
    const ARENA_EAGER_COMMIT: c_int = 4;
    // SAFETY: both are plain C calls with no preconditions; libc is set up
    // before any ELF constructor runs, and `getenv` only reads.
    unsafe {
        let set = !getenv(c"MIMALLOC_ARENA_EAGER_COMMIT".as_ptr()).is_null();
        // The option's number is v3's (3.x.y reports 3xxyy).
        if !set && (30_000..40_000).contains(&mi_version()) {
            mi_option_set(ARENA_EAGER_COMMIT, 0);
        }
    }
}
