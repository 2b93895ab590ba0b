//! The CPU thread count, settled once per process.
//!
//! candle asks how many threads to use on every matrix product, and without `RAYON_NUM_THREADS` in
//! the environment it works the answer out again each time — on x86 Linux by parsing `/proc/cpuinfo`
//! (`num_cpus::get_physical`). At the toy model's sizes that was ≈ 6 % of a training step's critical
//! path. [`settle`] writes the count candle would pick into the variable once, so every later
//! product only reads it: the same number of threads, the same results, less work.

/// Sets `RAYON_NUM_THREADS` to candle's own default when it is unset (an operator's value wins).
///
/// # Safety
///
/// Mutates the process environment: call it at the start of `main`, before any other thread exists
/// (before an async runtime is built), as `std::env::set_var` requires.
#[allow(unsafe_code)]
pub unsafe fn settle() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // SAFETY: the caller guarantees that no other thread exists yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
}
