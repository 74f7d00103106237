//! Running inputs through their profiles: the one computation behind both
//! served requests (the batcher) and shadow samples
//! (the shadow worker).
//!
//! Inputs are grouped by the stem they need (a profile's, or for `auto` the
//! detector's choice for that image), so that each stem is looked up or folded
//! once; then the model runs them all as one batch, each image with its stem.

use std::sync::Arc;

use crate::model::Stem;
use crate::serve::auto::{self, AutoChoice};
use crate::serve::preprocess;
use crate::serve::profile::{AUTO, CLEAN, Profile, SignatureRef, Table};
use crate::serve::registry::Registry;
use crate::{Error, Result, bail};

/// One input's logits, and what `auto` chose for it.
pub struct Served {
    pub logits: Vec<f32>,
    pub auto: Option<AutoChoice>,
}

/// Runs each input through the profile given with it, all from `table`: the
/// stem once per distinct stem (for `auto`, per distinct choice of the
/// detector), then the shared trunk once for all. Answers in input order.
/// Records no serving metrics, so that shadow runs can use it too.
pub fn compute(
    registry: &Registry,
    table: &Table,
    inputs: &[(&[f32], &Arc<Profile>)],
) -> Vec<Result<Served>> {
    let model = registry.model();
    // Per input: its group, and auto's choice.
    let mut groups: Vec<(Route, Vec<usize>)> = Vec::new();
    let mut picks = Vec::with_capacity(inputs.len());
    for (i, (input, profile)) in inputs.iter().enumerate() {
        let (route, pick) = match registry.auto().filter(|_| profile.name == AUTO) {
            Some(auto) => {
                let pick = {
                    let _s = tracing::debug_span!("detect").entered();
                    auto.choose(input, model, &table.signatures)
                };
                // Served clean: with the clean profile's requests.
                let clean = table
                    .profiles
                    .get(CLEAN)
                    .filter(|_| pick.signatures.is_empty());
                let route = match clean {
                    Some(clean) => Route::Profile(clean.clone()),
                    None => Route::Auto(pick.signatures.clone()),
                };
                (route, Some(pick))
            }
            None => (Route::Profile((*profile).clone()), None),
        };
        picks.push(pick);
        match groups.iter_mut().find(|(r, _)| r.same(&route)) {
            Some((_, members)) => members.push(i),
            None => groups.push((route, vec![i])),
        }
    }
    let mut out: Vec<Option<Result<Served>>> = (0..inputs.len()).map(|_| None).collect();
    // Each group's stem, then one batch of every input whose stem is there.
    let mut stems: Vec<(Arc<Stem>, &[usize])> = Vec::with_capacity(groups.len());
    for (route, members) in &groups {
        let _s = tracing::debug_span!("stem", route = %route, n = members.len()).entered();
        let stem = match route {
            Route::Profile(p) => registry.stem(table, p),
            Route::Auto(refs) => registry
                .auto()
                .ok_or_else(|| Error::Internal("auto is not enabled".into()))
                .and_then(|a| a.stem(model, refs, &table.signatures)),
        };
        match stem {
            Ok(stem) => stems.push((stem, members)),
            Err(e) => {
                for &i in members {
                    out[i] = Some(Err(Error::Internal(e.to_string())));
                }
            }
        }
    }
    let computed: Vec<(usize, &Stem)> = (stems.iter())
        .flat_map(|(stem, members)| members.iter().map(move |&i| (i, &**stem)))
        .collect();
    if !computed.is_empty() {
        let logits = {
            let _s = tracing::debug_span!("forward", n = computed.len()).entered();
            let batch: Vec<&[f32]> = computed.iter().map(|(i, _)| inputs[*i].0).collect();
            let each: Vec<&Stem> = computed.iter().map(|(_, s)| *s).collect();
            preprocess::batch(&batch, &model.config, model.device())
                .and_then(|x| model.forward_mixed(&each, &x))
                .and_then(|l| Ok(l.to_vec2::<f32>()?))
        };
        match logits {
            Ok(rows) => {
                for ((i, _), logits) in computed.into_iter().zip(rows) {
                    out[i] = Some(finite(logits).map(|logits| Served {
                        logits,
                        auto: picks[i].take(),
                    }));
                }
            }
            Err(e) => {
                for (i, _) in computed {
                    out[i] = Some(Err(Error::Internal(e.to_string())));
                }
            }
        }
    }
    out.into_iter()
        .map(|o| o.unwrap_or_else(|| Err(Error::Internal("an input was not computed".into()))))
        .collect()
}

/// A finite input can still overflow inside the network; its "prediction"
/// would be noise, so it is refused rather than answered.
fn finite(logits: Vec<f32>) -> Result<Vec<f32>> {
    if logits.iter().any(|v| !v.is_finite()) {
        bail!(
            InvalidArgument,
            "the input drives the model to non-finite logits (inf or NaN); send an \
             image, or a tensor normalized like the model's input (values near [-10, 10])"
        );
    }
    Ok(logits)
}

/// What folds the stem a group of inputs is served with.
enum Route {
    /// A profile's own stem.
    Profile(Arc<Profile>),
    /// `auto`'s choice of signatures and alphas.
    Auto(Vec<SignatureRef>),
}

impl Route {
    fn same(&self, other: &Route) -> bool {
        match (self, other) {
            (Route::Profile(a), Route::Profile(b)) => Arc::ptr_eq(a, b),
            (Route::Auto(a), Route::Auto(b)) => a == b,
            _ => false,
        }
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Profile(p) => f.write_str(&p.name),
            Route::Auto(refs) => write!(f, "auto:{}", auto::describe(refs)),
        }
    }
}
