//! What a model derives from a signature once and keeps while the signature
//! lives: its deltas on a GPU, or laid out in the CPU convs' packed order. So a
//! profile switch converts nothing.

use std::sync::{Arc, Mutex, Weak};

use crate::Result;
use crate::patch::signature::Signature;

/// Keyed by a weak reference: it never keeps a signature alive, and while an
/// entry exists its address cannot be reused by another signature.
#[derive(Debug)]
pub(super) struct SignatureCache<T> {
    entries: Mutex<Vec<(Weak<Signature>, Arc<T>)>>,
}

impl<T> Default for SignatureCache<T> {
    fn default() -> Self {
        SignatureCache {
            entries: Mutex::default(),
        }
    }
}

impl<T> SignatureCache<T> {
    /// `sig`'s entry, made by `make` on first use. Entries of dropped
    /// signatures are let go on the way.
    pub(super) fn get(
        &self,
        sig: &Arc<Signature>,
        make: impl FnOnce(&Signature) -> Result<T>,
    ) -> Result<Arc<T>> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|(s, _)| s.strong_count() > 0);
        if let Some((_, v)) = entries
            .iter()
            .find(|(s, _)| std::ptr::eq(s.as_ptr(), Arc::as_ptr(sig)))
        {
            return Ok(v.clone());
        }
        let made = Arc::new(make(sig)?);
        entries.push((Arc::downgrade(sig), made.clone()));
        Ok(made)
    }

    /// The sum of `size` over the live entries.
    pub(super) fn bytes(&self, size: impl Fn(&T) -> usize) -> usize {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        (entries.iter())
            .filter(|(s, _)| s.strong_count() > 0)
            .map(|(_, v)| size(v))
            .sum()
    }
}
