//! Events: weather and sensor reports that switch robustness on by rules.
//!
//! A report (`kind`, `severity`, `scope`, `observed_at`, optional `ttl`) is
//! matched against the rules: the first rule for its kind whose severity range
//! holds it names the profile to activate for the report's scope, and for how
//! long. Each (rule, scope) has one activation, whose id is derived from both:
//! a report while it runs extends it (a refresh), and once it has ended a new
//! report starts it again. Hysteresis keeps a flapping sensor from thrashing
//! the profile: an activation lasts at least `min_hold`, a refresh only moves
//! the end when it gains at least a quarter of the TTL, and after an end the
//! (rule, scope) stays off for `cooldown`. Reports less than three quarters of a
//! TTL apart therefore keep an activation on without a gap.

use std::collections::{BTreeSet, HashMap};
use std::ops::RangeInclusive;
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::serve::activation::{Activation, MAX_ACTIVATIONS, MAX_TTL_MS, validate_scope};
use crate::serve::change::Change;
use crate::serve::profile::{Table, validate_name};
use crate::{Error, Result, bail};

/// The corruption kinds an event may report: ImageNet-C's, its extras, and rain.
pub const KINDS: &[&str] = &[
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "gaussian_blur",
    "snow",
    "frost",
    "fog",
    "rain",
    "spatter",
    "brightness",
    "contrast",
    "saturate",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
];
/// Severities run from 1 to 5, as in ImageNet-C.
pub const SEVERITIES: RangeInclusive<u8> = 1..=5;
/// Largest event body accepted over HTTP.
pub const MAX_EVENT_BYTES: usize = 16 << 10;
/// How far an observation may lie in the future (clock skew) or the past.
const MAX_SKEW_MS: u64 = 5 * 60 * 1000;
const MAX_AGE_MS: u64 = 24 * 3600 * 1000;

/// One report, as it arrives (JSON over HTTP, or the gRPC message).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub kind: String,
    pub severity: u8,
    pub scope: String,
    /// When it was observed, RFC 3339; absent: now.
    #[serde(default)]
    pub observed_at: Option<String>,
    /// How long it holds, in seconds; absent: the rule's TTL.
    #[serde(default)]
    pub ttl_seconds: Option<f64>,
    /// The reporter's own id for it, for the audit trail.
    #[serde(default)]
    pub id: Option<String>,
}

/// What became of a report.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// No rule covers its kind and severity; nothing changes.
    NoRule,
    /// A new activation began.
    Activated,
    /// The running activation's end moved later.
    Extended,
    /// The running activation already lasts long enough.
    Held,
    /// Its (rule, scope) ended less than `cooldown` ago; nothing changes.
    Cooldown,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::NoRule => "no_rule",
            Outcome::Activated => "activated",
            Outcome::Extended => "extended",
            Outcome::Held => "held",
            Outcome::Cooldown => "cooldown",
        }
    }
}

/// The decision on one report: what to change, if anything.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub outcome: Outcome,
    /// The activation it concerns, and its end after the change.
    pub activation: Option<Activation>,
    pub change: Option<Change>,
}

/// One rule: reports of `kind` with a severity in `severity` switch `profile` on.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub kind: String,
    pub severity: RangeInclusive<u8>,
    pub profile: String,
    pub ttl: Duration,
}

/// The `[events]` table of the config file.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub rules: Vec<Rule>,
    pub min_hold: Duration,
    pub cooldown: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    min_hold: Option<String>,
    #[serde(default)]
    cooldown: Option<String>,
    #[serde(default)]
    rule: Vec<RuleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    name: Option<String>,
    kind: String,
    severity: [u8; 2],
    profile: String,
    ttl: String,
}

fn duration(what: &str, s: &str) -> Result<Duration> {
    humantime::parse_duration(s).map_err(|e| {
        Error::InvalidArgument(format!(
            "{what} {s:?} is not a duration like 90s or 2h: {e}"
        ))
    })
}

impl Rules {
    /// Parses the `[events]` table: `min_hold`, `cooldown` and `[[events.rule]]`
    /// entries of `kind`, `severity = [low, high]`, `profile`, `ttl`.
    pub fn parse(toml_text: &str) -> Result<Rules> {
        let f: RulesFile = toml::from_str(toml_text)
            .map_err(|e| Error::InvalidArgument(format!("event rules: {e}")))?;
        let mut rules = Vec::new();
        for (i, r) in f.rule.into_iter().enumerate() {
            let name = r.name.unwrap_or_else(|| format!("{}-{}", r.kind, i + 1));
            validate_name("rule", &name)?;
            validate_name("profile", &r.profile)?;
            if !KINDS.contains(&r.kind.as_str()) {
                bail!(
                    InvalidArgument,
                    "rule {name:?}: unknown kind {:?}; known: {}",
                    r.kind,
                    KINDS.join(", ")
                );
            }
            let [lo, hi] = r.severity;
            if lo > hi || !SEVERITIES.contains(&lo) || !SEVERITIES.contains(&hi) {
                bail!(
                    InvalidArgument,
                    "rule {name:?}: severity [{lo}, {hi}] is not a range within 1..=5"
                );
            }
            let ttl = duration("ttl", &r.ttl)?;
            if ttl.is_zero() || ttl.as_millis() > MAX_TTL_MS as u128 {
                bail!(
                    InvalidArgument,
                    "rule {name:?}: ttl must be between 1 ms and 30 days"
                );
            }
            rules.push(Rule {
                name,
                kind: r.kind,
                severity: lo..=hi,
                profile: r.profile,
                ttl,
            });
        }
        let or_zero =
            |what, v: Option<String>| v.map_or(Ok(Duration::ZERO), |s| duration(what, &s));
        Ok(Rules {
            rules,
            min_hold: or_zero("min_hold", f.min_hold)?,
            cooldown: or_zero("cooldown", f.cooldown)?,
        })
    }

    /// The first rule for `kind` at `severity`.
    pub fn rule_for(&self, kind: &str, severity: u8) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| r.kind == kind && r.severity.contains(&severity))
    }
}

/// A report, checked: its observation instant and hold in milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub event: Event,
    pub observed_ms: u64,
    pub ttl_ms: Option<u64>,
}

impl Event {
    /// Refuses what no rule should see: an unknown kind, a severity out of
    /// range, a bad scope, a negative or absurd TTL, an observation time that
    /// is not RFC 3339 or lies far from `now_ms`.
    pub fn check(self, now_ms: u64) -> Result<Checked> {
        if !KINDS.contains(&self.kind.as_str()) {
            bail!(
                InvalidArgument,
                "unknown event kind {}; known: {}",
                crate::error::clip(&self.kind),
                KINDS.join(", ")
            );
        }
        if !SEVERITIES.contains(&self.severity) {
            bail!(
                InvalidArgument,
                "severity {} is outside 1..=5",
                self.severity
            );
        }
        validate_scope(&self.scope)?;
        if let Some(id) = &self.id {
            validate_name("event id", id)?;
        }
        let ttl_ms = match self.ttl_seconds {
            None => None,
            Some(t) if t.is_finite() && t > 0.0 && t * 1000.0 <= MAX_TTL_MS as f64 => {
                Some((t * 1000.0).ceil() as u64)
            }
            Some(t) => bail!(
                InvalidArgument,
                "ttl_seconds {t} must be a positive number of at most 30 days"
            ),
        };
        let observed_ms = match &self.observed_at {
            None => now_ms,
            Some(t) => {
                let at = humantime::parse_rfc3339_weak(t).map_err(|_| {
                    Error::InvalidArgument(format!(
                        "observed_at {} is not an RFC 3339 time like 2026-11-29T06:00:00Z",
                        crate::error::clip(t)
                    ))
                })?;
                let ms = at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                if ms > now_ms + MAX_SKEW_MS || ms + MAX_AGE_MS < now_ms {
                    bail!(
                        InvalidArgument,
                        "observed_at {} is more than 5 minutes ahead or a day behind the server's clock",
                        crate::error::clip(t)
                    );
                }
                ms
            }
        };
        Ok(Checked {
            event: self,
            observed_ms,
            ttl_ms,
        })
    }
}

/// Planned ends remembered at most: as many as the table holds activations.
const MAX_ENDS: usize = MAX_ACTIVATIONS;

/// The last planned end of each activation the rules made, kept only while its
/// cooldown can still refuse a report, and for at most [`MAX_ENDS`] of them:
/// beyond that the end nearest its expiry is forgotten, so a flood of scopes
/// can at worst let a scope start again before its cooldown is over.
#[derive(Default)]
struct Ends {
    by_id: HashMap<String, u64>,
    /// The same entries, soonest end first: what pruning and eviction take.
    by_end: BTreeSet<(u64, String)>,
}

impl Ends {
    fn get(&self, id: &str) -> Option<u64> {
        self.by_id.get(id).copied()
    }

    fn set(&mut self, id: &str, until_ms: u64) {
        if let Some(old) = self.by_id.insert(id.to_string(), until_ms) {
            self.by_end.remove(&(old, id.to_string()));
        }
        self.by_end.insert((until_ms, id.to_string()));
        if self.by_id.len() > MAX_ENDS {
            self.pop_soonest();
        }
    }

    /// Forgets the ends whose cooldown is over at `now_ms`: they refuse nothing more.
    fn prune(&mut self, cooldown_ms: u64, now_ms: u64) {
        while self
            .by_end
            .first()
            .is_some_and(|(until, _)| until.saturating_add(cooldown_ms) <= now_ms)
        {
            self.pop_soonest();
        }
    }

    fn pop_soonest(&mut self) {
        if let Some((_, id)) = self.by_end.pop_first() {
            self.by_id.remove(&id);
        }
    }
}

/// The rules and what they remember between reports.
pub struct Events {
    rules: Rules,
    ends: Mutex<Ends>,
}

impl Events {
    pub fn new(rules: Rules) -> Self {
        Events {
            rules,
            ends: Mutex::default(),
        }
    }

    /// Decides what a checked report changes, against `table` at `now_ms`.
    pub fn decide(&self, ev: &Checked, table: &Table, now_ms: u64) -> Decision {
        let e = &ev.event;
        let Some(rule) = self.rules.rule_for(&e.kind, e.severity) else {
            return Decision {
                outcome: Outcome::NoRule,
                activation: None,
                change: None,
            };
        };
        let id = activation_id(&rule.name, &e.scope);
        let ttl = ev.ttl_ms.unwrap_or(rule.ttl.as_millis() as u64);
        let hold = self.rules.min_hold.as_millis() as u64;
        // The hold runs from the observation, so a late report does not outlast its event.
        let wanted = ev.observed_ms.saturating_add(ttl).max(now_ms + 1);
        let current = table.activations.all().iter().find(|a| a.id == id);
        let reason = format!("{} severity {} at {}", e.kind, e.severity, e.scope);
        match current {
            Some(a) if a.is_active(now_ms) => {
                let until = wanted.max(a.since_ms.saturating_add(hold));
                // Only a gain of a quarter TTL moves the end: a report per
                // second makes one change per quarter TTL, not one per second,
                // and any report in the last three quarters extends it.
                if until < a.until_ms.saturating_add(ttl / 4) {
                    return Decision {
                        outcome: Outcome::Held,
                        activation: Some((**a).clone()),
                        change: None,
                    };
                }
                let mut next = (**a).clone();
                next.until_ms = until;
                Decision {
                    outcome: Outcome::Extended,
                    change: Some(Change::Extend {
                        id,
                        until_ms: until,
                    }),
                    activation: Some(next),
                }
            }
            _ => {
                let cooling = self.rules.cooldown.as_millis() as u64;
                let ended = {
                    let mut ends = self.ends();
                    ends.prune(cooling, now_ms);
                    ends.get(&id)
                };
                if ended.is_some_and(|t| now_ms < t.saturating_add(cooling)) {
                    return Decision {
                        outcome: Outcome::Cooldown,
                        activation: None,
                        change: None,
                    };
                }
                let a = Activation {
                    id,
                    scope: e.scope.clone(),
                    profile: rule.profile.clone(),
                    since_ms: now_ms,
                    until_ms: wanted.max(now_ms.saturating_add(hold)),
                    reason,
                };
                Decision {
                    outcome: Outcome::Activated,
                    change: Some(Change::Activate(a.clone())),
                    activation: Some(a),
                }
            }
        }
    }

    /// Remembers the end an applied decision set, for the cooldown.
    pub fn applied(&self, d: &Decision) {
        if let Some(a) = &d.activation {
            self.ends().set(&a.id, a.until_ms);
        }
    }

    fn ends(&self) -> std::sync::MutexGuard<'_, Ends> {
        self.ends.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The activation id of a rule's activation for a scope: `ev-<rule>-<hash>`.
fn activation_id(rule: &str, scope: &str) -> String {
    let h = Sha256::digest(scope.as_bytes());
    let rule: String = rule.chars().take(40).collect();
    format!("ev-{rule}-{:02x}{:02x}{:02x}{:02x}", h[0], h[1], h[2], h[3])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::activation::Activations;
    use std::sync::Arc;

    const RULES: &str = r#"
min_hold = "10s"
cooldown = "20s"
[[rule]]
kind = "fog"
severity = [2, 5]
profile = "fog"
ttl = "4s"
"#;

    fn table(activations: Vec<Activation>) -> Table {
        Table {
            generation: 0,
            signatures: Default::default(),
            profiles: Default::default(),
            default_profile: "clean".into(),
            activations: Arc::new(Activations::new(activations)),
        }
    }

    fn fog(severity: u8, now: u64) -> Checked {
        let e = Event {
            kind: "fog".into(),
            severity,
            scope: "site-a/".into(),
            observed_at: None,
            ttl_seconds: None,
            id: None,
        };
        e.check(now).unwrap()
    }

    #[test]
    fn holds_refreshes_and_cooldowns_follow_the_rules() {
        let events = Events::new(Rules::parse(RULES).unwrap());
        let t0 = 1_000_000;
        let d = events.decide(&fog(1, t0), &table(vec![]), t0);
        assert_eq!(d.outcome, Outcome::NoRule);
        let d = events.decide(&fog(3, t0), &table(vec![]), t0);
        assert_eq!(d.outcome, Outcome::Activated);
        let a = d.activation.clone().unwrap();
        assert_eq!(a.until_ms, t0 + 10_000, "the minimum hold, not the 4 s TTL");
        events.applied(&d);
        let running = || table(vec![a.clone()]);
        // Inside the hold a report gains nothing.
        let d = events.decide(&fog(3, t0 + 5_000), &running(), t0 + 5_000);
        assert_eq!(d.outcome, Outcome::Held);
        // Near the end it moves the end, once it gains a quarter TTL.
        let d = events.decide(&fog(3, t0 + 6_900), &running(), t0 + 6_900);
        assert_eq!(d.outcome, Outcome::Held, "gains 0.9 s < 1 s");
        let d = events.decide(&fog(3, t0 + 7_000), &running(), t0 + 7_000);
        assert_eq!(d.outcome, Outcome::Extended);
        assert_eq!(d.activation.as_ref().unwrap().until_ms, t0 + 11_000);
        events.applied(&d);
        // Reports every TTL/2 keep it on with no gap.
        let mut current = d.activation.clone().unwrap();
        for k in 1..20 {
            let now = t0 + 7_000 + k * 2_000;
            assert!(current.is_active(now), "lapsed at {k}");
            let d = events.decide(&fog(3, now), &table(vec![current.clone()]), now);
            if let Some(next) = d.activation.filter(|_| d.outcome == Outcome::Extended) {
                current = next;
            }
        }
        // After the end, the rule rests for the cooldown, then starts again.
        let ended = table(vec![Activation {
            until_ms: t0 + 11_000,
            ..a.clone()
        }]);
        events.applied(&Decision {
            outcome: Outcome::Extended,
            activation: Some(Activation {
                until_ms: t0 + 11_000,
                ..a.clone()
            }),
            change: None,
        });
        let d = events.decide(&fog(3, t0 + 20_000), &ended, t0 + 20_000);
        assert_eq!(d.outcome, Outcome::Cooldown);
        let d = events.decide(&fog(3, t0 + 32_000), &ended, t0 + 32_000);
        assert_eq!(d.outcome, Outcome::Activated);
        assert_eq!(
            d.activation.unwrap().id,
            a.id,
            "one activation per rule and scope"
        );
    }

    #[test]
    fn ends_are_forgotten_once_their_cooldown_is_over() {
        let events = Events::new(Rules::parse(RULES).unwrap());
        let t0 = 1_000_000;
        let d = events.decide(&fog(3, t0), &table(vec![]), t0);
        events.applied(&d);
        let a = d.activation.unwrap();
        let ended = table(vec![a.clone()]);
        let over = a.until_ms + 20_000;
        let d = events.decide(&fog(3, over - 1), &ended, over - 1);
        assert_eq!(d.outcome, Outcome::Cooldown);
        assert_eq!(events.ends().get(&a.id), Some(a.until_ms));
        let d = events.decide(&fog(3, over), &ended, over);
        assert_eq!(d.outcome, Outcome::Activated);
        let ends = events.ends();
        assert!(ends.by_id.is_empty() && ends.by_end.is_empty());
    }

    #[test]
    fn ends_are_capped_forgetting_the_soonest_first() {
        let mut ends = Ends::default();
        ends.set("ev-0", 5);
        ends.set("ev-0", 1_000);
        assert_eq!(ends.by_end.len(), 1, "a new end replaces the old one");
        for i in 1..=MAX_ENDS as u64 {
            ends.set(&format!("ev-{i}"), 1_000 + i);
        }
        assert_eq!((ends.by_id.len(), ends.by_end.len()), (MAX_ENDS, MAX_ENDS));
        assert_eq!(ends.get("ev-0"), None, "the soonest end went first");
        assert_eq!(ends.get("ev-1"), Some(1_001));
    }

    #[test]
    fn reports_and_rules_are_checked() {
        let ok = Event {
            kind: "fog".into(),
            severity: 3,
            scope: "site-a/".into(),
            observed_at: Some("2027-01-15T08:00:00Z".into()),
            ttl_seconds: Some(60.0),
            id: Some("e1".into()),
        };
        let at = humantime::parse_rfc3339("2027-01-15T08:00:00Z").unwrap();
        let at_ms = at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let c = ok.clone().check(at_ms + 1000).unwrap();
        assert_eq!((c.observed_ms, c.ttl_ms), (at_ms, Some(60_000)));
        let bad = [
            Event {
                kind: "volcano".into(),
                ..ok.clone()
            },
            Event {
                severity: 0,
                ..ok.clone()
            },
            Event {
                severity: 6,
                ..ok.clone()
            },
            Event {
                scope: "/x".into(),
                ..ok.clone()
            },
            Event {
                ttl_seconds: Some(-1.0),
                ..ok.clone()
            },
            Event {
                ttl_seconds: Some(f64::INFINITY),
                ..ok.clone()
            },
            Event {
                ttl_seconds: Some(1e9),
                ..ok.clone()
            },
            Event {
                observed_at: Some("dawn".into()),
                ..ok.clone()
            },
            Event {
                id: Some("a b".into()),
                ..ok.clone()
            },
        ];
        for e in bad {
            assert!(e.clone().check(at_ms).is_err(), "{e:?}");
        }
        assert!(
            ok.clone().check(at_ms + 2 * MAX_AGE_MS).is_err(),
            "observed long before now"
        );
        assert!(
            ok.check(at_ms - 2 * MAX_SKEW_MS).is_err(),
            "observed far ahead of now"
        );
        for rules in [
            "[[rule]]\nkind = \"volcano\"\nseverity = [1, 2]\nprofile = \"x\"\nttl = \"1h\"",
            "[[rule]]\nkind = \"fog\"\nseverity = [4, 2]\nprofile = \"x\"\nttl = \"1h\"",
            "[[rule]]\nkind = \"fog\"\nseverity = [1, 2]\nprofile = \"x\"\nttl = \"soon\"",
            "[[rule]]\nkind = \"fog\"\nseverity = [1, 2]\nprofile = \"x\"\nttl = \"1h\"\nwind = 3",
        ] {
            assert!(Rules::parse(rules).is_err(), "{rules}");
        }
    }
}
