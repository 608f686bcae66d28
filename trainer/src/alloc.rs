//! How the trainer's process keeps freed memory.
//!
//! A training step allocates and frees the same large buffers every time (activations, logits
//! of 100 MB, their gradients). glibc's malloc serves buffers above its mmap threshold with
//! fresh `mmap`s and returns them to the kernel on `free`, and trims the heap's top beyond
//! 128 KiB: so every step page-faults and zeroes its buffers anew. Measured on SmolLM2 with
//! `tributary-trainer bench` (2 threads): 3.90 s a step as glibc ships, 2.90 s with the heap
//! only (no mmap) and no trimming, and the same peak RSS (the peak is the peak either way).
//! The memory goes back to the system between tasks ([`release_free_memory`]), not between
//! steps.

/// Serves every allocation from the heap and never trims it during training (glibc on Linux;
/// elsewhere the system allocator is left as it is).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's tuning parameters; it is called before any other
    // thread exists and takes no pointers.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Returns the heap's free memory to the system (between tasks, when the trainer idles).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free pages of malloc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}
