//! Architectures as plain descriptions: which convs exist, with which torchvision
//! names, shapes and strides, grouped into units (the stem conv, then each
//! residual block in order). Weights live elsewhere; this only names them.

use serde::{Deserialize, Serialize};

/// The architectures rws serves. torchvision's ResNets, plus a small ResNet for
/// 28×28 inputs (3×3 stem, no max-pool) with configurable widths and depths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch")]
pub enum Arch {
    #[serde(rename = "resnet18")]
    ResNet18,
    #[serde(rename = "resnet34")]
    ResNet34,
    #[serde(rename = "resnet50")]
    ResNet50,
    #[serde(rename = "resnet101")]
    ResNet101,
    #[serde(rename = "resnet-small")]
    Small {
        widths: Vec<usize>,
        depths: Vec<usize>,
        #[serde(default = "one")]
        stem_stride: usize,
    },
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitKind {
    /// conv1 + bn1 + ReLU, then a 3×3/2 max-pool when `maxpool`.
    Stem {
        maxpool: bool,
    },
    Basic,
    Bottleneck,
}

/// A conv and the BatchNorm after it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvSpec {
    pub conv: String,
    pub bn: String,
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvSpec {
    pub fn weight_shape(&self) -> [usize; 4] {
        [
            self.out_channels,
            self.in_channels,
            self.kernel,
            self.kernel,
        ]
    }

    /// The base tensors this layer reads: conv weight, then BN weight, bias,
    /// running mean, running var.
    pub fn tensor_names(&self) -> [String; 5] {
        let bn = &self.bn;
        [
            format!("{}.weight", self.conv),
            format!("{bn}.weight"),
            format!("{bn}.bias"),
            format!("{bn}.running_mean"),
            format!("{bn}.running_var"),
        ]
    }
}

/// A unit: the stem conv, or one residual block. For blocks, `convs` is the main
/// path in order, followed by the downsample conv when `downsample` is set.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitSpec {
    pub name: String,
    pub kind: UnitKind,
    pub convs: Vec<ConvSpec>,
    pub downsample: bool,
}

impl Arch {
    /// The name signatures record, so one made for another architecture is refused.
    pub fn name(&self) -> &'static str {
        match self {
            Arch::ResNet18 => "resnet18",
            Arch::ResNet34 => "resnet34",
            Arch::ResNet50 => "resnet50",
            Arch::ResNet101 => "resnet101",
            Arch::Small { .. } => "resnet-small",
        }
    }

    fn layout(&self) -> (UnitKind, Vec<usize>, Vec<usize>) {
        let wide = vec![64, 128, 256, 512];
        match self {
            Arch::ResNet18 => (UnitKind::Basic, vec![2, 2, 2, 2], wide),
            Arch::ResNet34 => (UnitKind::Basic, vec![3, 4, 6, 3], wide),
            Arch::ResNet50 => (UnitKind::Bottleneck, vec![3, 4, 6, 3], wide),
            Arch::ResNet101 => (UnitKind::Bottleneck, vec![3, 4, 23, 3], wide),
            Arch::Small { widths, depths, .. } => (UnitKind::Basic, depths.clone(), widths.clone()),
        }
    }

    /// Residual blocks in each stage (layer1, layer2, ...).
    pub fn stage_depths(&self) -> Vec<usize> {
        self.layout().1
    }

    pub fn block_count(&self) -> usize {
        self.layout().1.iter().sum()
    }

    /// Channels entering the classifier.
    pub fn feature_channels(&self) -> usize {
        let (kind, _, widths) = self.layout();
        let last = widths.last().copied().unwrap_or(0);
        if kind == UnitKind::Bottleneck {
            last * 4
        } else {
            last
        }
    }

    /// Every unit in forward order: the stem, then the blocks of layer1, layer2, ...
    pub fn units(&self, in_channels: usize) -> Vec<UnitSpec> {
        let (kind, depths, widths) = self.layout();
        let (stem_width, stem) = match self {
            Arch::Small {
                widths,
                stem_stride,
                ..
            } => (
                widths[0],
                conv("conv1", "bn1", in_channels, widths[0], 3, *stem_stride),
            ),
            _ => (64, conv("conv1", "bn1", in_channels, 64, 7, 2)),
        };
        let maxpool = !matches!(self, Arch::Small { .. });
        let mut units = vec![UnitSpec {
            name: "conv1".into(),
            kind: UnitKind::Stem { maxpool },
            convs: vec![stem],
            downsample: false,
        }];
        let expansion = if kind == UnitKind::Bottleneck { 4 } else { 1 };
        let mut in_ch = stem_width;
        for (stage, (&depth, &width)) in depths.iter().zip(&widths).enumerate() {
            for b in 0..depth {
                let stride = if b == 0 && stage > 0 { 2 } else { 1 };
                let p = format!("layer{}.{b}", stage + 1);
                let out_ch = width * expansion;
                let mut convs = match kind {
                    UnitKind::Bottleneck => vec![
                        conv(
                            &format!("{p}.conv1"),
                            &format!("{p}.bn1"),
                            in_ch,
                            width,
                            1,
                            1,
                        ),
                        conv(
                            &format!("{p}.conv2"),
                            &format!("{p}.bn2"),
                            width,
                            width,
                            3,
                            stride,
                        ),
                        conv(
                            &format!("{p}.conv3"),
                            &format!("{p}.bn3"),
                            width,
                            out_ch,
                            1,
                            1,
                        ),
                    ],
                    _ => vec![
                        conv(
                            &format!("{p}.conv1"),
                            &format!("{p}.bn1"),
                            in_ch,
                            width,
                            3,
                            stride,
                        ),
                        conv(
                            &format!("{p}.conv2"),
                            &format!("{p}.bn2"),
                            width,
                            width,
                            3,
                            1,
                        ),
                    ],
                };
                let downsample = stride != 1 || in_ch != out_ch;
                if downsample {
                    convs.push(conv(
                        &format!("{p}.downsample.0"),
                        &format!("{p}.downsample.1"),
                        in_ch,
                        out_ch,
                        1,
                        stride,
                    ));
                }
                units.push(UnitSpec {
                    name: p,
                    kind,
                    convs,
                    downsample,
                });
                in_ch = out_ch;
            }
        }
        units
    }

    /// Every base tensor the model reads, with its shape, in forward order.
    pub fn tensor_shapes(&self, in_channels: usize, classes: usize) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        for unit in self.units(in_channels) {
            for c in &unit.convs {
                let [w, g, b, m, v] = c.tensor_names();
                out.push((w, c.weight_shape().to_vec()));
                for n in [g, b, m, v] {
                    out.push((n, vec![c.out_channels]));
                }
            }
        }
        out.push(("fc.weight".into(), vec![classes, self.feature_channels()]));
        out.push(("fc.bias".into(), vec![classes]));
        out
    }
}

fn conv(
    conv: &str,
    bn: &str,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
) -> ConvSpec {
    ConvSpec {
        conv: conv.into(),
        bn: bn.into(),
        in_channels,
        out_channels,
        kernel,
        stride,
        padding: kernel / 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resnet18_matches_torchvision_layout() {
        let shapes = Arch::ResNet18.tensor_shapes(3, 1000);
        let params: usize = shapes
            .iter()
            .filter(|(n, _)| !n.contains("running"))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        // torchvision.models.resnet18().parameters() count.
        assert_eq!(params, 11_689_512);
        assert!(
            shapes
                .iter()
                .any(|(n, s)| n == "layer2.0.downsample.0.weight" && s == &[128, 64, 1, 1])
        );
    }

    #[test]
    fn resnet50_matches_torchvision_layout() {
        let shapes = Arch::ResNet50.tensor_shapes(3, 1000);
        let params: usize = shapes
            .iter()
            .filter(|(n, _)| !n.contains("running"))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(params, 25_557_032);
        assert!(
            shapes
                .iter()
                .any(|(n, s)| n == "layer1.0.downsample.0.weight" && s == &[256, 64, 1, 1])
        );
    }
}
