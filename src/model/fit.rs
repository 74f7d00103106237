//! Whether a signature fits the served model. The check lives with the model, so
//! that the signature format knows nothing about models.

use std::collections::HashMap;

use super::Model;
use crate::patch::signature::Signature;
use crate::{Result, bail};

impl Model {
    /// Checks that `sig` fits this model: same architecture, every delta targets a
    /// patchable tensor of the same shape, and (unless `allow_transfer`) it was made
    /// against these exact base weights. Returns whether it is a transfer.
    pub fn check_signature(&self, sig: &Signature, allow_transfer: bool) -> Result<bool> {
        let model = self;
        let arch = model.config.arch.name();
        if sig.meta.arch != arch {
            bail!(
                InvalidArgument,
                "signature was made for architecture {:?}, but the served model is {arch:?}",
                sig.meta.arch
            );
        }
        let targets: HashMap<String, Vec<usize>> = model.patchable_tensors().collect();
        for (name, d) in sig.deltas() {
            match targets.get(name) {
                None => bail!(
                    InvalidArgument,
                    "signature patches {name}, which is not a tensor of the patchable stem (conv1 + {} blocks)",
                    model.config.patchable_blocks
                ),
                Some(shape) if shape != &d.shape => bail!(
                    InvalidArgument,
                    "signature delta {name} has shape {:?}, but the base tensor has shape {shape:?}",
                    d.shape
                ),
                Some(_) => {}
            }
        }
        let transferred = sig.meta.base_fingerprint != model.fingerprint();
        if transferred && !allow_transfer {
            bail!(
                FailedPrecondition,
                "signature was made against base weights {} but the served base is {}; load it with allow_transfer to apply it to an updated backbone",
                sig.meta.base_fingerprint,
                model.fingerprint()
            );
        }
        Ok(transferred)
    }
}
