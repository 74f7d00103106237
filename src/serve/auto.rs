//! The `auto` profile's policy: from what the detector says about one image to
//! the signatures and alphas that serve it.
//!
//! - The most probable kind wins if its probability reaches the threshold, the
//!   image's statistics are familiar for that kind, and it is a corruption with
//!   a loaded signature of the same name; otherwise the image is served clean. A detector unsure between kinds, or facing one it
//!   never saw, should not patch: a wrong signature costs clean accuracy.
//! - Alpha follows the estimated severity, rounded to 1..=5, from a table per
//!   kind: the best alpha grows with severity (the alpha sweep in RESULTS.md),
//!   and a fixed alpha of 1 over-patches mild corruptions.
//!
//! The threshold and the table are tuned on held-out training digits by
//! `rws train-detector` and travel in the detector file's metadata
//! (`rws.policy.threshold`, `rws.policy.alpha.<kind>` = five alphas).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use crate::model::detector::{Detection, Detector};
use crate::model::{Model, Stem};
use crate::serve::profile::{LoadedSignature, SignatureRef, materialize};
use crate::{Error, Result, bail};

/// Stems kept for `auto`'s choices: a policy names at most one alpha per kind
/// and severity, so eight kinds fit.
const MAX_STEMS: usize = 48;

/// Largest alpha a policy may name.
const MAX_ALPHA: f32 = 4.0;

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Least probability of the top kind for it to be patched.
    pub threshold: f32,
    /// Per kind, the alpha at severities 1 to 5.
    pub alphas: BTreeMap<String, [f32; 5]>,
}

/// What `auto` chose for one image, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoChoice {
    /// Empty: served clean.
    pub signatures: Vec<SignatureRef>,
    /// The detector's top kind (`clean` included) and its probability.
    pub kind: String,
    pub confidence: f32,
    /// The estimated severity, rounded.
    pub severity: u8,
    /// Whether the image looked like the training images of that kind.
    pub familiar: bool,
}

/// The detector and its policy, and the stems folded for the choices made so
/// far, kept apart from the profiles' stems so that `auto` never evicts them.
pub struct Auto {
    detector: Detector,
    policy: Policy,
    stems: Mutex<Vec<Folded>>,
}

/// A stem folded for signatures at alphas; holding the signatures keeps their
/// addresses, the key, from being reused while it lives.
struct Folded {
    patches: Vec<(Arc<LoadedSignature>, u32)>,
    stem: Arc<Stem>,
}

impl Auto {
    /// Takes a detector checked against `model`'s base weights, and the policy it carries.
    pub fn new(detector: Detector, model: &Model) -> Result<Auto> {
        detector.check_base(model.fingerprint())?;
        let policy = Policy::from_metadata(&detector.metadata)?;
        Ok(Auto {
            detector,
            policy,
            stems: Mutex::new(Vec::new()),
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// What serves one `[C, H, W]` input. A kind whose signature is not loaded
    /// (an operator unloaded it) is served clean.
    pub fn choose(
        &self,
        input: &[f32],
        model: &Model,
        loaded: &BTreeMap<String, Arc<LoadedSignature>>,
    ) -> AutoChoice {
        let detection = self.detector.detect(input, &model.config);
        let mut choice = self.policy.choose(&detection, &self.detector.kinds);
        choice.signatures.retain(|r| loaded.contains_key(&r.name));
        choice
    }

    /// The stem for `refs`, all loaded in `loaded`: from the cache, else folded
    /// like a profile of the same definition (so bitwise equal to it) and kept,
    /// the least recently used leaving first.
    pub fn stem(
        &self,
        model: &Model,
        refs: &[SignatureRef],
        loaded: &BTreeMap<String, Arc<LoadedSignature>>,
    ) -> Result<Arc<Stem>> {
        let resolved = refs
            .iter()
            .map(|r| {
                loaded.get(&r.name).cloned().ok_or_else(|| {
                    Error::Internal(format!("auto chose {:?}, which is not loaded", r.name))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let same = |f: &Folded| {
            f.patches.len() == refs.len()
                && f.patches
                    .iter()
                    .zip(resolved.iter().zip(refs))
                    .all(|((s, a), (t, r))| Arc::ptr_eq(s, t) && *a == r.alpha.to_bits())
        };
        {
            let mut stems = self.stems.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = stems.iter().position(same) {
                let hit = stems.remove(i);
                let stem = hit.stem.clone();
                stems.push(hit);
                return Ok(stem);
            }
        }
        // Folded outside the lock; two workers folding the same choice at once
        // both get a correct stem, and one of them is kept.
        let stem = Arc::new(materialize(model, "auto", &resolved, refs)?);
        let mut stems = self.stems.lock().unwrap_or_else(|e| e.into_inner());
        if !stems.iter().any(same) {
            if stems.len() == MAX_STEMS {
                stems.remove(0);
            }
            let patches = resolved
                .into_iter()
                .zip(refs)
                .map(|(s, r)| (s, r.alpha.to_bits()))
                .collect();
            stems.push(Folded {
                patches,
                stem: stem.clone(),
            });
        }
        Ok(stem)
    }
}

/// `fog@0.75` (several joined by `+`), or `clean` for none: how metrics,
/// traces and tools name one of `auto`'s choices.
pub fn describe(refs: &[SignatureRef]) -> String {
    match refs {
        [] => crate::serve::profile::CLEAN.to_string(),
        refs => refs
            .iter()
            .map(|r| format!("{}@{}", r.name, r.alpha))
            .collect::<Vec<_>>()
            .join("+"),
    }
}

impl Policy {
    /// Chooses for one detection; `kinds` are the detector's, `clean` first.
    pub fn choose(&self, d: &Detection, kinds: &[String]) -> AutoChoice {
        let top = crate::model::argmax(&d.probs);
        let kind = kinds.get(top).cloned().unwrap_or_default();
        let confidence = d.probs.get(top).copied().unwrap_or(0.0);
        let severity = d.severity.round().clamp(1.0, 5.0) as u8;
        let signatures = match self.alphas.get(&kind) {
            Some(alphas) if top > 0 && d.familiar && confidence >= self.threshold => {
                vec![SignatureRef {
                    name: kind.clone(),
                    alpha: alphas[usize::from(severity) - 1],
                }]
            }
            _ => Vec::new(),
        };
        AutoChoice {
            signatures,
            kind,
            confidence,
            severity,
            familiar: d.familiar,
        }
    }

    /// Reads the policy a detector file carries.
    pub fn from_metadata(md: &HashMap<String, String>) -> Result<Policy> {
        let threshold: f32 = md
            .get("rws.policy.threshold")
            .ok_or_else(|| {
                Error::InvalidArgument(
                    "the detector carries no policy (rws.policy.threshold); train it with `rws train-detector`"
                        .into(),
                )
            })?
            .parse()
            .map_err(|_| Error::InvalidArgument("rws.policy.threshold is not a number".into()))?;
        if !(0.0..=1.0).contains(&threshold) {
            bail!(
                InvalidArgument,
                "rws.policy.threshold must be within [0, 1]"
            );
        }
        let mut alphas = BTreeMap::new();
        for (key, value) in md {
            let Some(kind) = key.strip_prefix("rws.policy.alpha.") else {
                continue;
            };
            let parsed: Vec<f32> = value
                .split(',')
                .map(|v| v.trim().parse::<f32>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| Error::InvalidArgument(format!("{key} must be five numbers")))?;
            let Ok(five) = <[f32; 5]>::try_from(parsed) else {
                bail!(
                    InvalidArgument,
                    "{key} must be five numbers, one per severity"
                );
            };
            if five.iter().any(|a| !(0.0..=MAX_ALPHA).contains(a)) {
                bail!(
                    InvalidArgument,
                    "{key}: alphas must be within [0, {MAX_ALPHA}]"
                );
            }
            alphas.insert(kind.to_string(), five);
        }
        Ok(Policy { threshold, alphas })
    }

    /// The metadata entries that carry this policy.
    pub fn to_metadata(&self) -> HashMap<String, String> {
        let mut md = HashMap::from([(
            "rws.policy.threshold".to_string(),
            self.threshold.to_string(),
        )]);
        for (kind, a) in &self.alphas {
            let list: Vec<String> = a.iter().map(f32::to_string).collect();
            md.insert(format!("rws.policy.alpha.{kind}"), list.join(","));
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds() -> Vec<String> {
        ["clean", "fog", "snow"].map(String::from).to_vec()
    }

    fn policy() -> Policy {
        Policy {
            threshold: 0.6,
            alphas: BTreeMap::from([
                ("fog".to_string(), [0.5, 0.75, 1.0, 1.0, 1.25]),
                ("snow".to_string(), [0.25, 0.5, 0.75, 0.75, 1.0]),
            ]),
        }
    }

    fn det(probs: [f32; 3], severity: f32) -> Detection {
        Detection {
            probs: probs.to_vec(),
            severity,
            familiar: true,
        }
    }

    #[test]
    fn the_confident_top_kind_is_patched_at_its_severitys_alpha() {
        let c = policy().choose(&det([0.1, 0.8, 0.1], 4.6), &kinds());
        assert_eq!(c.kind, "fog");
        assert_eq!(c.severity, 5);
        assert_eq!(
            c.signatures,
            vec![SignatureRef {
                name: "fog".into(),
                alpha: 1.25
            }]
        );
        let c = policy().choose(&det([0.1, 0.1, 0.8], 1.2), &kinds());
        assert_eq!(c.signatures[0].alpha, 0.25);
    }

    #[test]
    fn unsure_clean_or_unknown_kinds_are_served_clean() {
        // Below the threshold.
        assert!(
            policy()
                .choose(&det([0.3, 0.5, 0.2], 3.0), &kinds())
                .signatures
                .is_empty()
        );
        // Sure, but of statistics unlike that kind's training images.
        let unfamiliar = Detection {
            familiar: false,
            ..det([0.0, 0.95, 0.05], 3.0)
        };
        assert!(policy().choose(&unfamiliar, &kinds()).signatures.is_empty());
        // Clean on top, however sure of a severity.
        let c = policy().choose(&det([0.9, 0.05, 0.05], 5.0), &kinds());
        assert_eq!((c.kind.as_str(), c.signatures.len()), ("clean", 0));
        // A kind the policy has no alphas for (no signature shipped for it).
        let mut p = policy();
        p.alphas.remove("snow");
        assert!(
            p.choose(&det([0.0, 0.1, 0.9], 3.0), &kinds())
                .signatures
                .is_empty()
        );
    }

    #[test]
    fn the_policy_travels_in_metadata_and_bad_entries_are_refused() {
        let p = policy();
        assert_eq!(Policy::from_metadata(&p.to_metadata()).unwrap(), p);
        let mut md = p.to_metadata();
        md.insert("rws.policy.alpha.fog".into(), "1,2,3".into());
        assert!(Policy::from_metadata(&md).is_err());
        let mut md = p.to_metadata();
        md.insert("rws.policy.alpha.fog".into(), "1,2,3,NaN,1".into());
        assert!(Policy::from_metadata(&md).is_err());
        let mut md = p.to_metadata();
        md.insert("rws.policy.threshold".into(), "2".into());
        assert!(Policy::from_metadata(&md).is_err());
        assert!(Policy::from_metadata(&HashMap::new()).is_err());
    }
}
