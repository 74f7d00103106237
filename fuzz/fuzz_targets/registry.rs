//! Sequences of admin operations (load, unload, put, delete, set default,
//! activate, deactivate, expire) on one registry over the shipped model, with
//! at most two resident stems so that eviction and refills happen. After every
//! step:
//! - every profile names only loaded signatures, and the default exists;
//! - the generation never goes back;
//! - a refused operation changes nothing;
//! - the clean profile still gives the clean logits, bit for bit.
#![no_main]

use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use candle_core::{Device, Tensor};
use libfuzzer_sys::fuzz_target;
use rws::patch::signature::Signature;
use rws::serve::activation::Activation;
use rws::serve::change::Change;
use rws::serve::journal::Cause;
use rws::serve::profile::{Origin, SignatureRef, Table};
use rws::serve::registry::Registry;
use rws::serve::state::State;

/// Names the operations draw from: the built-ins, free names, an invalid one.
const NAMES: [&str; 6] = ["clean", "auto", "a", "b", "fog", "no such/name"];

#[derive(Arbitrary, Debug)]
enum Op {
    Load {
        name: u8,
        file: u8,
        transfer: bool,
    },
    Unload(u8),
    Put {
        name: u8,
        refs: Vec<(u8, i8)>,
        replace: bool,
    },
    Delete(u8),
    SetDefault(u8),
    Activate {
        profile: u8,
        scope: bool,
        until: u16,
    },
    Deactivate(u8),
    Expire(u16),
}

fn name(i: u8) -> String {
    NAMES[i as usize % NAMES.len()].to_string()
}

/// The shipped model's fog and contrast signatures.
fn signatures() -> &'static [Arc<Signature>; 2] {
    static S: OnceLock<[Arc<Signature>; 2]> = OnceLock::new();
    S.get_or_init(|| {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/mnist-resnet/signatures/"
        );
        ["fog", "contrast"].map(|n| {
            let path = format!("{dir}{n}.rws.safetensors");
            Arc::new(Signature::load(std::path::Path::new(&path)).expect("a shipped signature"))
        })
    })
}

/// One fixed input and the clean model's logits for it.
fn clean() -> &'static (Tensor, Vec<f32>) {
    static C: OnceLock<(Tensor, Vec<f32>)> = OnceLock::new();
    C.get_or_init(|| {
        let model = rws_fuzz::model();
        let [h, w] = model.config.input_size;
        let values: Vec<f32> = (0..h * w).map(|i| (i % 7) as f32 * 0.3 - 0.9).collect();
        let x = Tensor::from_vec(values, (1, 1, h, w), &Device::Cpu).unwrap();
        let stem = model.materialize(&[]).unwrap();
        let logits = model.forward(&stem, &x).unwrap().flatten_all().unwrap();
        (x, logits.to_vec1().unwrap())
    })
}

fn change(op: &Op, step: usize) -> Result<Change, (String, usize, bool)> {
    Ok(match *op {
        Op::Load {
            name: n,
            file,
            transfer,
        } => return Err((name(n), file as usize % 2, transfer)),
        Op::Unload(n) => Change::Unload(name(n)),
        Op::Put {
            name: n,
            ref refs,
            replace,
        } => Change::put(
            &name(n),
            refs.iter()
                .map(|&(s, a)| SignatureRef {
                    name: name(s),
                    alpha: a as f32 / 32.0,
                })
                .collect(),
            replace,
        ),
        Op::Delete(n) => Change::Delete(name(n)),
        Op::SetDefault(n) => Change::SetDefault(name(n)),
        Op::Activate {
            profile,
            scope,
            until,
        } => Change::Activate(Activation {
            id: format!("act-{step}"),
            scope: if scope { "site-a/" } else { "" }.into(),
            profile: name(profile),
            since_ms: 1_000,
            until_ms: until as u64 * 100,
            reason: "fuzz".into(),
        }),
        Op::Deactivate(k) => Change::Deactivate(format!("act-{k}")),
        Op::Expire(at) => Change::Expire(at as u64 * 100),
    })
}

fn check(table: &Table, registry: &Registry) {
    for p in table.profiles.values() {
        for r in &p.signatures {
            assert!(
                table.signatures.contains_key(&r.name),
                "{} names {}",
                p.name,
                r.name
            );
        }
    }
    assert!(table.profiles.contains_key(&table.default_profile));
    let model = registry.model();
    let stem = registry.stem(table, &table.profiles["clean"]).unwrap();
    let (x, want) = clean();
    let got = model.forward(&stem, x).unwrap().flatten_all().unwrap();
    let got: Vec<f32> = got.to_vec1().unwrap();
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got), bits(want), "clean logits changed");
}

fuzz_target!(|ops: Vec<Op>| {
    let registry = Registry::new(Arc::clone(rws_fuzz::model()), 2).unwrap();
    let cause = Cause::new("fuzz", "");
    for (step, op) in ops.iter().take(32).enumerate() {
        let before = registry.snapshot();
        let result = match change(op, step) {
            Ok(c) => registry.apply(&c, &cause).map(drop),
            Err((n, file, transfer)) => {
                let sig = signatures()[file].clone();
                registry
                    .load(&n, sig, Origin::memory(transfer), &cause)
                    .map(drop)
            }
        };
        let after = registry.snapshot();
        assert!(after.generation >= before.generation);
        if result.is_err() {
            assert_eq!(after.generation, before.generation, "{op:?} was refused");
            assert_eq!(State::of(&after), State::of(&before), "{op:?} was refused");
        }
        check(&after, &registry);
    }
});
