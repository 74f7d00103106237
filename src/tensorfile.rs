//! safetensors files whose bytes depend only on their content. The crate writes
//! the `__metadata__` map in hash order, which changes from run to run, so the
//! same signature came out as different bytes (and a different SHA-256) each
//! time it was extracted. [`canonical`] rewrites the header with sorted keys:
//! the same length, so every data offset stays valid.

use std::collections::BTreeMap;

use crate::{Error, Result};

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
