//! The safetensors files rws writes (signatures, detectors): read with errors
//! that name the kind of file, and written so that their bytes depend only on
//! their content. The crate writes the `__metadata__` map in hash order, which
//! changes from run to run, so the same signature came out as different bytes
//! (and a different SHA-256) each time it was extracted. [`canonical`] rewrites
//! the header with sorted keys: the same length, so every data offset stays valid.

use std::collections::{BTreeMap, HashMap};

use safetensors::SafeTensors;

use crate::{Error, Result, bail};

/// The metadata of a file of kind `what` (`signature`, `detector`).
pub struct Metadata {
    what: &'static str,
    map: HashMap<String, String>,
}

impl Metadata {
    pub fn get(&self, key: &str) -> Option<&String> {
        self.map.get(key)
    }

    /// The entry `key`, which the file must have.
    pub fn require(&self, key: &str) -> Result<String> {
        self.map
            .get(key)
            .cloned()
            .ok_or_else(|| Error::InvalidArgument(format!("{} metadata lacks {key:?}", self.what)))
    }

    /// Refuses a file whose format version (`key`) is not `expected`.
    pub fn check_version(&self, key: &str, expected: &str) -> Result<()> {
        let version = self.require(key)?;
        if version != expected {
            bail!(
                InvalidArgument,
                "{} format version {} is not supported (expected {expected})",
                self.what,
                crate::error::clip(&version)
            );
        }
        Ok(())
    }

    /// Every entry whose key starts with `prefix`.
    pub fn with_prefix(&self, prefix: &str) -> HashMap<String, String> {
        self.map
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Parses the bytes of a file of kind `what`: its tensors and its metadata.
pub fn read<'a>(bytes: &'a [u8], what: &'static str) -> Result<(SafeTensors<'a>, Metadata)> {
    let bad = |e: safetensors::SafeTensorError| {
        Error::InvalidArgument(format!("not a valid safetensors file: {e}"))
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(bad)?;
    let tensors = SafeTensors::deserialize(bytes).map_err(bad)?;
    let map = header.metadata().clone().unwrap_or_default();
    Ok((tensors, Metadata { what, map }))
}

/// `bytes` (a safetensors file) with its header's keys in sorted order.
pub fn canonical(mut bytes: Vec<u8>) -> Result<Vec<u8>> {
    let bad =
        |why: &str| Error::Internal(format!("cannot canonicalize a safetensors header: {why}"));
    let n = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        .ok_or_else(|| bad("too short"))?;
    let header = bytes.get(8..8 + n).ok_or_else(|| bad("truncated"))?;
    let text = std::str::from_utf8(header).map_err(|_| bad("not UTF-8"))?;
    let mut entries: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(text.trim_end()).map_err(|e| bad(&e.to_string()))?;
    // Sorted through a BTreeMap whatever serde_json's map type is.
    if let Some(md) = entries.remove("__metadata__") {
        let md: BTreeMap<String, String> =
            serde_json::from_value(md).map_err(|e| bad(&e.to_string()))?;
        entries.insert(
            "__metadata__".into(),
            serde_json::to_value(md).map_err(|e| bad(&e.to_string()))?,
        );
    }
    let mut sorted = serde_json::to_string(&entries).map_err(|e| bad(&e.to_string()))?;
    if sorted.len() > n {
        return Err(bad("the sorted header is longer"));
    }
    // The crate pads the header with spaces to keep the data aligned.
    sorted.extend(std::iter::repeat_n(' ', n - sorted.len()));
    bytes[8..8 + n].copy_from_slice(sorted.as_bytes());
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{Dtype, TensorView};
    use std::collections::HashMap;

    #[test]
    fn the_same_content_gives_the_same_bytes() {
        let data: Vec<u8> = (0..24).collect();
        let write = || {
            let md: HashMap<String, String> = (0..20)
                .map(|i| (format!("key{i}"), format!("v{i}")))
                .collect();
            let views = vec![
                (
                    "b",
                    TensorView::new(Dtype::F32, vec![2, 1], &data[..8]).unwrap(),
                ),
                (
                    "a",
                    TensorView::new(Dtype::F32, vec![4], &data[8..]).unwrap(),
                ),
            ];
            canonical(safetensors::serialize(views, Some(md)).unwrap()).unwrap()
        };
        let first = write();
        // Twenty keys in hash order: another map instance orders them otherwise.
        for _ in 0..5 {
            assert_eq!(write(), first);
        }
        let st = safetensors::SafeTensors::deserialize(&first).unwrap();
        assert_eq!(st.tensor("a").unwrap().data(), &data[8..]);
        assert_eq!(st.tensor("b").unwrap().data(), &data[..8]);
        assert!(canonical(b"short".to_vec()).is_err());
    }
}
