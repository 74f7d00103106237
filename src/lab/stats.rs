//! One number over several training seeds, as the report prints it (`mean ± sd`)
//! and the plots draw it (a mark at the mean, an error bar of ± sd).

/// The mean of `v`; 0 when it is empty.
pub fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    sum / n.max(1) as f64
}

/// The mean of one value per seed and its sample standard deviation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub mean: f64,
    /// Sample standard deviation (divided by n − 1); 0 for a single seed.
    pub sd: f64,
    /// Seeds.
    pub n: usize,
}

impl Estimate {
    pub fn of(values: &[f64]) -> Estimate {
        let n = values.len();
        let mean = values.iter().sum::<f64>() / n.max(1) as f64;
        let sd = match n {
            0 | 1 => 0.0,
            _ => (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt(),
        };
        Estimate { mean, sd, n }
    }

    /// Of `f` over `items`, one per seed.
    pub fn over<T>(items: &[T], f: impl Fn(&T) -> f64) -> Estimate {
        Estimate::of(&items.iter().map(f).collect::<Vec<_>>())
    }

    /// `mean ± sd` with one decimal; the mean alone for a single seed.
    pub fn cell(&self) -> String {
        self.show(1, false)
    }

    /// As [`Estimate::cell`], with the mean's sign always shown (a gain).
    pub fn gain(&self) -> String {
        self.show(1, true)
    }

    /// As [`Estimate::cell`], with two decimals (an alpha).
    pub fn alpha(&self) -> String {
        self.show(2, false)
    }

    fn show(&self, decimals: usize, signed: bool) -> String {
        let mean = match signed {
            true => format!("{:+.decimals$}", self.mean),
            false => format!("{:.decimals$}", self.mean),
        };
        match self.n {
            0 | 1 => mean,
            _ => format!("{mean} ± {:.decimals$}", self.sd),
        }
    }
}

/// The 95% Wilson score interval for `k` successes in `n` trials, as fractions:
/// unlike the normal approximation it stays inside [0, 1] and is honest at the
/// small samples and extreme rates these evaluations have.
pub fn wilson(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    const Z: f64 = 1.959_963_984_540_054;
    let (n, p) = (n as f64, k as f64 / n as f64);
    let centre = p + Z * Z / (2.0 * n);
    let spread = Z * (p * (1.0 - p) / n + Z * Z / (4.0 * n * n)).sqrt();
    let denom = 1.0 + Z * Z / n;
    (
        ((centre - spread) / denom).max(0.0),
        ((centre + spread) / denom).min(1.0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_the_published_interval() {
        let (lo, hi) = wilson(17, 20);
        assert!(
            (lo - 0.640).abs() < 5e-4 && (hi - 0.948).abs() < 5e-4,
            "{lo} {hi}"
        );
        assert_eq!(wilson(0, 0), (0.0, 1.0));
        let (lo, hi) = wilson(20, 20);
        assert!((hi - 1.0).abs() < 1e-9 && (lo - 0.839).abs() < 5e-4, "{lo}");
    }

    #[test]
    fn mean_and_sample_standard_deviation() {
        let e = Estimate::of(&[90.0, 92.0, 97.0]);
        assert_eq!(e.mean, 93.0);
        // Deviations -3, -1, 4: squares 9 + 1 + 16 = 26, over n - 1 = 2.
        assert!((e.sd - 13f64.sqrt()).abs() < 1e-12);
        assert_eq!(e.cell(), "93.0 ± 3.6");
        assert_eq!(Estimate::of(&[-1.25, -2.75]).gain(), "-2.0 ± 1.1");
        assert_eq!(Estimate::of(&[2.0, 4.0]).gain(), "+3.0 ± 1.4");
        assert_eq!(Estimate::of(&[0.5, 0.75, 1.0]).alpha(), "0.75 ± 0.25");
        // One seed: no spread to show.
        let one = Estimate::of(&[95.44]);
        assert_eq!((one.sd, one.cell()), (0.0, "95.4".to_string()));
    }
}
