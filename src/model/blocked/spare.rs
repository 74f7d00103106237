//! Activation buffers kept for reuse, per thread. A forward pass allocates one
//! buffer per layer, of the same sizes on every pass; a fresh `vec![0.0; n]`
//! of a size glibc recycles from its heap is cleared with memset, which took
//! 15% of MobileNetV2's time at batch 1. A buffer taken from here holds stale
//! values: its taker overwrites all of it (see [`super::Blocked::output`]).

use std::cell::RefCell;

/// Buffers kept per thread: more than the layers alive at once (a block's
/// input, its shortcut, the conv's output).
const KEEP: usize = 8;
/// Bytes kept per thread at most.
const KEEP_BYTES: usize = 256 << 20;

thread_local! {
    static SPARE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of `len` floats, stale ones where a kept buffer was big enough,
/// zeros otherwise.
pub(super) fn take(len: usize) -> Vec<f32> {
    let kept = SPARE.with_borrow_mut(|spare| {
        // The smallest that fits: a big buffer stays for a big layer.
        let (i, _) = (spare.iter().enumerate())
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())?;
        Some(spare.swap_remove(i))
    });
    match kept {
        Some(mut b) => {
            b.truncate(len);
            b.resize(len, 0.0);
            b
        }
        None => vec![0.0; len],
    }
}

/// Keeps `b` for a later [`take`] on this thread, unless the thread holds
/// enough already (then the smallest kept buffer goes).
pub(super) fn give(b: Vec<f32>) {
    if b.capacity() == 0 {
        return;
    }
    // During thread teardown the pool may be gone: the buffer is just freed.
    let _ = SPARE.try_with(|spare| {
        let mut spare = spare.borrow_mut();
        spare.push(b);
        let bytes = |s: &Vec<Vec<f32>>| s.iter().map(|b| b.capacity() * 4).sum::<usize>();
        while spare.len() > KEEP || bytes(&spare) > KEEP_BYTES {
            let (i, _) = (spare.iter().enumerate())
                .min_by_key(|(_, b)| b.capacity())
                .expect("not empty");
            spare.swap_remove(i);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_buffer_is_taken_again_and_the_smallest_fit_first() {
        give(vec![1.0; 100]);
        give(vec![2.0; 1000]);
        let a = take(50);
        assert_eq!((a.len(), a.capacity(), a[0]), (50, 100, 1.0));
        let b = take(2000);
        assert!(b.iter().all(|v| *v == 0.0), "nothing fits: zeros");
        let c = take(900);
        assert_eq!((c.len(), c.capacity()), (900, 1000));
        for _ in 0..2 * KEEP {
            give(vec![0.0; 10]);
        }
        SPARE.with_borrow(|s| assert_eq!(s.len(), KEEP));
    }
}
