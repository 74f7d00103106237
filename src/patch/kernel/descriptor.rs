//! The descriptor table the CUDA kernel reads (`add_scale.cu`): the status
//! word, then one `Layer` per layer, then one `Signature` per layer and
//! signature, little-endian and packed exactly as the C structs. It is built
//! from plain device addresses, so it compiles in every build and is checked
//! against the C source there. Before, it sat behind the `cuda` feature, which CI
//! does not build, so a drift between the two would have shown only on a GPU.

/// Bytes of one `Delta`, one `Signature` and one `Layer` in add_scale.cu.
pub const DELTA_BYTES: usize = 32;
pub const SIGNATURE_BYTES: usize = 5 * DELTA_BYTES + 8;
pub const LAYER_BYTES: usize = 80;

/// One `Layer`: the clean parameters' device addresses, where its outputs go,
/// and which blocks and signatures are its.
#[derive(Debug, Clone, Copy, Default)]
pub struct LayerRecord {
    pub weight: u64,
    pub gamma: u64,
    pub beta: u64,
    pub mean: u64,
    pub var: u64,
    /// Element offsets of the folded weight and bias in the output.
    pub out_w: u64,
    pub out_b: u64,
    pub out_channels: u32,
    pub cols: u32,
    pub first_block: u32,
    pub first_sig: u32,
    pub n_sigs: u32,
    pub eps: f32,
}

/// One `Delta`: its data, and for int forms the per-row scale and offset;
/// all zero when the signature does not patch that part.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeltaRecord {
    pub data: u64,
    pub scale: u64,
    pub offset: u64,
    /// `KIND_*` in add_scale.cu: 0 f32, 1 f16, 2 int8, 3 int4.
    pub kind: u32,
    /// Elements per row, for the int forms.
    pub cols: u32,
}

/// The table's bytes, written in order: [`Table::new`], every layer, then
/// every signature.
#[derive(Debug)]
pub struct Table(Vec<u8>);

impl Table {
    /// A table whose status word starts as `status`.
    pub fn new(status: u64) -> Table {
        Table(status.to_le_bytes().to_vec())
    }

    pub fn layer(&mut self, l: &LayerRecord) {
        for p in [l.weight, l.gamma, l.beta, l.mean, l.var, l.out_w, l.out_b] {
            self.u64(p);
        }
        for v in [l.out_channels, l.cols, l.first_block, l.first_sig, l.n_sigs] {
            self.u32(v);
        }
        self.u32(l.eps.to_bits());
    }

    /// One signature's parts (weight, gamma, beta, mean, var) and its alpha.
    pub fn signature(&mut self, parts: [DeltaRecord; 5], alpha: f32) {
        for d in parts {
            for p in [d.data, d.scale, d.offset] {
                self.u64(p);
            }
            self.u32(d.kind);
            self.u32(d.cols);
        }
        self.u32(alpha.to_bits());
        self.u32(0);
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const SOURCE: &str = include_str!("add_scale.cu");

    /// Each field of a struct of add_scale.cu with its byte offset, and the
    /// struct's size and alignment, by the C rules (x86-64 and CUDA agree):
    /// every field at a multiple of its alignment, the size a multiple of the
    /// largest one.
    type Layout = (Vec<(String, usize)>, usize, usize);

    fn c_layout(name: &str, known: &HashMap<String, Layout>) -> Layout {
        let start = SOURCE
            .find(&format!("struct {name} {{"))
            .unwrap_or_else(|| panic!("add_scale.cu has no struct {name}"));
        let body = &SOURCE[start..][..SOURCE[start..].find("};").unwrap()];
        let (mut fields, mut at, mut max_align) = (Vec::new(), 0usize, 1usize);
        for line in body.lines().skip(1) {
            let decl = line.split("//").next().unwrap().trim();
            let Some(decl) = decl.strip_suffix(';') else {
                continue;
            };
            let (ty, field) = decl.rsplit_once(' ').unwrap();
            let (field, count) = match field.split_once('[') {
                Some((f, n)) => (f, n.trim_end_matches(']').parse::<usize>().unwrap()),
                None => (field, 1),
            };
            let (size, align) = match ty {
                t if t.ends_with('*') => (8, 8),
                "unsigned long long" => (8, 8),
                "unsigned int" | "float" => (4, 4),
                t => {
                    let (_, size, align) = &known[t];
                    (*size, *align)
                }
            };
            at = at.next_multiple_of(align);
            fields.push((field.to_string(), at));
            at += size * count;
            max_align = max_align.max(align);
        }
        (fields, at.next_multiple_of(max_align), max_align)
    }

    fn layouts() -> HashMap<String, Layout> {
        let mut known = HashMap::new();
        for name in ["Delta", "Signature", "Layer"] {
            let l = c_layout(name, &known);
            known.insert(name.to_string(), l);
        }
        known
    }

    /// The value at `at` in `bytes`, as a little-endian integer of `n` bytes.
    fn read(bytes: &[u8], at: usize, n: usize) -> u64 {
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(&bytes[at..at + n]);
        u64::from_le_bytes(v)
    }

    #[test]
    fn sizes_match_the_c_structs() {
        let l = layouts();
        assert_eq!(l["Delta"].1, DELTA_BYTES);
        assert_eq!(l["Signature"].1, SIGNATURE_BYTES);
        assert_eq!(l["Layer"].1, LAYER_BYTES);
        for (name, bytes) in [
            ("Delta", DELTA_BYTES),
            ("Signature", SIGNATURE_BYTES),
            ("Layer", LAYER_BYTES),
        ] {
            let assert = format!("static_assert(sizeof({name}) == {bytes},");
            assert!(SOURCE.contains(&assert), "add_scale.cu lacks `{assert}`");
        }
    }

    /// Every field lands where the C struct has it: each gets a distinct value,
    /// which is read back at the C offset of the field of that name.
    #[test]
    fn every_field_sits_at_its_c_offset() {
        let l = layouts();
        let layer = LayerRecord {
            weight: 1,
            gamma: 2,
            beta: 3,
            mean: 4,
            var: 5,
            out_w: 6,
            out_b: 7,
            out_channels: 8,
            cols: 9,
            first_block: 10,
            first_sig: 11,
            n_sigs: 12,
            eps: f32::from_bits(13),
        };
        let delta = |k: u64| DeltaRecord {
            data: 100 * k + 1,
            scale: 100 * k + 2,
            offset: 100 * k + 3,
            kind: 100 * k as u32 + 4,
            cols: 100 * k as u32 + 5,
        };
        let mut t = Table::new(0xdead);
        t.layer(&layer);
        t.signature([1, 2, 3, 4, 5].map(delta), f32::from_bits(77));
        let bytes = t.bytes();
        assert_eq!(bytes.len(), 8 + LAYER_BYTES + SIGNATURE_BYTES);
        assert_eq!(read(bytes, 0, 8), 0xdead);

        let want: HashMap<&str, (u64, usize)> = [
            ("weight", (1, 8)),
            ("gamma", (2, 8)),
            ("beta", (3, 8)),
            ("mean", (4, 8)),
            ("var", (5, 8)),
            ("out_w", (6, 8)),
            ("out_b", (7, 8)),
            ("out_channels", (8, 4)),
            ("cols", (9, 4)),
            ("first_block", (10, 4)),
            ("first_sig", (11, 4)),
            ("n_sigs", (12, 4)),
            ("eps", (13, 4)),
        ]
        .into();
        let (fields, ..) = &l["Layer"];
        assert_eq!(fields.len(), want.len(), "Layer's fields");
        for (field, at) in fields {
            let (v, n) = want[field.as_str()];
            assert_eq!(read(bytes, 8 + at, n), v, "Layer.{field}");
        }

        let sig = 8 + LAYER_BYTES;
        let (sig_fields, ..) = &l["Signature"];
        let (delta_fields, ..) = &l["Delta"];
        let at = |f: &str| sig_fields.iter().find(|(n, _)| n == f).unwrap().1;
        for k in 0..5 {
            let base = sig + at("parts") + k * DELTA_BYTES;
            let d = delta(k as u64 + 1);
            for (field, off) in delta_fields {
                let (v, n) = match field.as_str() {
                    "data" => (d.data, 8),
                    "scale" => (d.scale, 8),
                    "offset" => (d.offset, 8),
                    "kind" => (d.kind as u64, 4),
                    "cols" => (d.cols as u64, 4),
                    other => panic!("Delta.{other} is not written"),
                };
                assert_eq!(read(bytes, base + off, n), v, "parts[{k}].{field}");
            }
        }
        assert_eq!(read(bytes, sig + at("alpha"), 4), 77, "Signature.alpha");
    }
}
