//! Architectures as plain descriptions: which convs exist, with which names,
//! shapes, strides, groups, padding and activations, grouped into units (the stem
//! first, then each block in order), and the classifier head after them. Weights
//! live elsewhere; this only names them. Every network rws serves is a chain of
//! units, each a chain of convs with an optional shortcut and pool, so one
//! forward pass ([`super::folded::forward_unit`]) runs them all.

use serde::{Deserialize, Serialize};

/// The architectures rws serves, with the tensor names of the weights they read:
/// torchvision's ResNets, VGG-16 (with and without BatchNorm) and MobileNetV2;
/// a small ResNet for 28×28 inputs (3×3 stem, no max-pool); the CIFAR VGG-16 of
/// the RWS paper's code; and EfficientNet-Lite0 with timm's names.
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
    /// torchvision's `vgg16`: convs with biases, no BatchNorm.
    #[serde(rename = "vgg16")]
    Vgg16,
    /// torchvision's `vgg16_bn`: convs with biases, each followed by BatchNorm.
    #[serde(rename = "vgg16-bn")]
    Vgg16Bn,
    /// The RWS paper's VGG-16 for 32×32 inputs (its code's `models/vgg.py`):
    /// `vgg16`'s convs without the last max-pool, a global average over the 2×2
    /// maps left, and one `classifier` layer.
    #[serde(rename = "vgg16-cifar")]
    Vgg16Cifar,
    #[serde(rename = "mobilenet-v2")]
    MobileNetV2,
    /// timm's `efficientnet_lite0`: no squeeze-excite, ReLU6, TensorFlow's
    /// "same" padding (the weights come from TensorFlow).
    #[serde(rename = "efficientnet-lite0")]
    EfficientNetLite0,
}

fn one() -> usize {
    1
}

/// What follows a conv and its BatchNorm (and the shortcut, for the conv that
/// ends a unit with one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None,
    Relu,
    /// `min(max(x, 0), 6)`: MobileNet's and EfficientNet-Lite's.
    Relu6,
}

impl Act {
    /// The activation of one value; NaN stays NaN, so an overflow upstream is
    /// still seen downstream.
    pub fn apply(self, v: f32) -> f32 {
        match self {
            Act::None => v,
            Act::Relu if v < 0.0 => 0.0,
            Act::Relu6 if v < 0.0 => 0.0,
            Act::Relu6 if v > 6.0 => 6.0,
            _ => v,
        }
    }
}

/// How a conv pads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// The same number of zeros on every side (PyTorch's).
    Symmetric(usize),
    /// TensorFlow's "SAME": `ceil(size / stride)` outputs, with the odd zero of
    /// an uneven total at the bottom or right.
    Same,
}

impl Padding {
    /// Zeros (before, after) along a dimension of `size` for `kernel` and `stride`.
    pub fn amounts(self, size: usize, kernel: usize, stride: usize) -> (usize, usize) {
        match self {
            Padding::Symmetric(p) => (p, p),
            Padding::Same => {
                let out = size.div_ceil(stride);
                let total = ((out - 1) * stride + kernel).saturating_sub(size);
                (total / 2, total - total / 2)
            }
        }
    }

    /// Whether it never pads more than `border` on a side, whatever the size.
    pub fn within(self, border: usize, kernel: usize) -> bool {
        match self {
            Padding::Symmetric(p) => p <= border,
            // At most kernel - 1 in all, the larger half after.
            Padding::Same => kernel.saturating_sub(1).div_ceil(2) <= border,
        }
    }

    /// Output size along a dimension of `size`.
    pub fn output(self, size: usize, kernel: usize, stride: usize) -> usize {
        let (a, b) = self.amounts(size, kernel, stride);
        (size + a + b).saturating_sub(kernel) / stride + 1
    }
}

/// A conv and the BatchNorm after it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvSpec {
    pub conv: String,
    /// The BatchNorm's name; `None` for a conv without one (VGG-16), which then
    /// has a bias.
    pub bn: Option<String>,
    /// Whether the conv has a bias of its own. Before a BatchNorm it is folded
    /// into the running mean, and so is not patched separately.
    pub bias: bool,
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: Padding,
    /// 1, or `in_channels` for a depthwise conv.
    pub groups: usize,
    pub act: Act,
}

/// The tensor names of a layer as the patch kernel reads it: the conv weight,
/// then BatchNorm's weight, bias, running mean and running variance. A conv
/// without BatchNorm has only a weight and its bias (in the bias's place).
#[derive(Debug, Clone, PartialEq)]
pub struct PartNames {
    pub weight: String,
    pub gamma: Option<String>,
    pub beta: Option<String>,
    pub mean: Option<String>,
    pub var: Option<String>,
}

impl PartNames {
    /// The names that exist, in kernel order.
    pub fn iter(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.weight).chain(
            [&self.gamma, &self.beta, &self.mean, &self.var]
                .into_iter()
                .flatten(),
        )
    }
}

impl ConvSpec {
    pub fn weight_shape(&self) -> [usize; 4] {
        [
            self.out_channels,
            self.in_channels / self.groups,
            self.kernel,
            self.kernel,
        ]
    }

    pub fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.groups == self.in_channels && self.groups == self.out_channels
    }

    /// The conv's own bias, when it has one.
    pub fn bias_name(&self) -> Option<String> {
        self.bias.then(|| format!("{}.bias", self.conv))
    }

    /// The tensors a signature may patch, as the kernel reads them.
    pub fn parts(&self) -> PartNames {
        let weight = format!("{}.weight", self.conv);
        match &self.bn {
            Some(bn) => PartNames {
                weight,
                gamma: Some(format!("{bn}.weight")),
                beta: Some(format!("{bn}.bias")),
                mean: Some(format!("{bn}.running_mean")),
                var: Some(format!("{bn}.running_var")),
            },
            None => PartNames {
                weight,
                gamma: None,
                beta: self.bias_name(),
                mean: None,
                var: None,
            },
        }
    }

    /// The tensors a signature may patch, with their shapes.
    pub fn patchable_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let parts = self.parts();
        let mut out = vec![(parts.weight.clone(), self.weight_shape().to_vec())];
        out.extend(
            parts
                .iter()
                .skip(1)
                .map(|n| (n.clone(), vec![self.out_channels])),
        );
        out
    }

    /// Every base tensor this layer reads, with its shape.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = self.patchable_tensors();
        if let (Some(b), Some(_)) = (self.bias_name(), &self.bn) {
            out.push((b, vec![self.out_channels]));
        }
        out
    }

    /// Output size (h, w) for an input of `(h, w)`.
    pub fn output_size(&self, (h, w): (usize, usize)) -> (usize, usize) {
        let (k, s) = (self.kernel, self.stride);
        (self.padding.output(h, k, s), self.padding.output(w, k, s))
    }
}

/// What joins a unit's input to the output of its last main-path conv (before
/// that conv's activation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortcut {
    None,
    Identity,
    /// The unit's last conv, run on the unit's input (ResNet's downsample).
    Projection,
}

/// A max-pool after a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// 3×3, stride 2, padding 1: after ResNet's stem.
    Max3,
    /// 2×2, stride 2: after each VGG stage.
    Max2,
}

impl Pool {
    pub fn output_size(self, (h, w): (usize, usize)) -> (usize, usize) {
        match self {
            Pool::Max3 => ((h + 2 - 3) / 2 + 1, (w + 2 - 3) / 2 + 1),
            Pool::Max2 => (h / 2, w / 2),
        }
    }
}

/// A unit: the stem, or one block. `convs` is the main path in order, then the
/// projection conv when `shortcut` is [`Shortcut::Projection`].
#[derive(Debug, Clone, PartialEq)]
pub struct UnitSpec {
    pub name: String,
    pub convs: Vec<ConvSpec>,
    pub shortcut: Shortcut,
    pub pool: Option<Pool>,
}

impl UnitSpec {
    /// The main path, and the projection conv if any.
    pub fn split(&self) -> (&[ConvSpec], Option<&ConvSpec>) {
        match self.shortcut {
            Shortcut::Projection => {
                let (last, main) = self.convs.split_last().expect("a block has convs");
                (main, Some(last))
            }
            _ => (&self.convs, None),
        }
    }

    pub fn output_size(&self, size: (usize, usize)) -> (usize, usize) {
        let size = (self.split().0.iter()).fold(size, |s, c| c.output_size(s));
        self.pool.map_or(size, |p| p.output_size(size))
    }

    pub fn out_channels(&self) -> usize {
        self.split().0.last().map_or(0, |c| c.out_channels)
    }
}

/// How the last unit's maps become the classifier's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    GlobalAverage,
    /// The maps as they are, channel-major (VGG's; its input size fixes the length).
    Flatten,
}

/// A fully connected layer: `name.weight` is `[outputs, inputs]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearSpec {
    pub name: String,
    pub inputs: usize,
    pub outputs: usize,
}

/// The classifier: a reduction, then linear layers with ReLU between them.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadSpec {
    pub reduce: Reduce,
    pub linears: Vec<LinearSpec>,
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
            Arch::Vgg16 => "vgg16",
            Arch::Vgg16Bn => "vgg16-bn",
            Arch::Vgg16Cifar => "vgg16-cifar",
            Arch::MobileNetV2 => "mobilenet-v2",
            Arch::EfficientNetLite0 => "efficientnet-lite0",
        }
    }

    /// Blocks after the stem.
    pub fn block_count(&self) -> usize {
        self.units(3).len() - 1
    }

    /// Blocks in the first stage (after the stem): the default patchable depth.
    pub fn first_stage_blocks(&self) -> usize {
        match self {
            Arch::Small { depths, .. } => depths[0],
            Arch::ResNet18 => 2,
            Arch::ResNet34 | Arch::ResNet50 | Arch::ResNet101 => 3,
            // VGG's first stage is the stem conv and one more.
            Arch::Vgg16 | Arch::Vgg16Bn | Arch::Vgg16Cifar => 1,
            Arch::MobileNetV2 | Arch::EfficientNetLite0 => 1,
        }
    }

    /// Every unit in forward order: the stem, then each block.
    pub fn units(&self, in_channels: usize) -> Vec<UnitSpec> {
        match self {
            Arch::Vgg16 | Arch::Vgg16Bn | Arch::Vgg16Cifar => self.vgg_units(in_channels),
            Arch::MobileNetV2 => mobilenet_v2_units(in_channels),
            Arch::EfficientNetLite0 => efficientnet_lite0_units(in_channels),
            _ => self.resnet_units(in_channels),
        }
    }

    /// The classifier after the units.
    pub fn head(&self, in_channels: usize, classes: usize) -> HeadSpec {
        let gap = |name: &str| HeadSpec {
            reduce: Reduce::GlobalAverage,
            linears: vec![LinearSpec {
                name: name.into(),
                inputs: self.feature_channels(in_channels),
                outputs: classes,
            }],
        };
        match self {
            Arch::Vgg16 | Arch::Vgg16Bn => {
                let fc = |i: usize, inputs, outputs| LinearSpec {
                    name: format!("classifier.{i}"),
                    inputs,
                    outputs,
                };
                HeadSpec {
                    reduce: Reduce::Flatten,
                    linears: vec![
                        fc(0, 512 * 7 * 7, 4096),
                        fc(3, 4096, 4096),
                        fc(6, 4096, classes),
                    ],
                }
            }
            Arch::Vgg16Cifar => gap("classifier"),
            Arch::MobileNetV2 => gap("classifier.1"),
            Arch::EfficientNetLite0 => gap("classifier"),
            _ => gap("fc"),
        }
    }

    /// Channels of the last unit's maps.
    pub fn feature_channels(&self, in_channels: usize) -> usize {
        self.units(in_channels)
            .last()
            .map_or(0, UnitSpec::out_channels)
    }

    /// Every base tensor the model reads, with its shape, in forward order.
    pub fn tensor_shapes(&self, in_channels: usize, classes: usize) -> Vec<(String, Vec<usize>)> {
        let mut out: Vec<_> = (self.units(in_channels).iter())
            .flat_map(|u| u.convs.iter().flat_map(ConvSpec::tensors))
            .collect();
        for l in self.head(in_channels, classes).linears {
            out.push((format!("{}.weight", l.name), vec![l.outputs, l.inputs]));
            out.push((format!("{}.bias", l.name), vec![l.outputs]));
        }
        out
    }

    fn resnet_units(&self, in_channels: usize) -> Vec<UnitSpec> {
        let wide = vec![64, 128, 256, 512];
        let (bottleneck, depths, widths) = match self {
            Arch::ResNet18 => (false, vec![2, 2, 2, 2], wide),
            Arch::ResNet34 => (false, vec![3, 4, 6, 3], wide),
            Arch::ResNet50 => (true, vec![3, 4, 6, 3], wide),
            Arch::ResNet101 => (true, vec![3, 4, 23, 3], wide),
            Arch::Small { widths, depths, .. } => (false, depths.clone(), widths.clone()),
            _ => unreachable!("not a ResNet"),
        };
        let (stem_width, stem, pool) = match self {
            Arch::Small {
                widths,
                stem_stride,
                ..
            } => (
                widths[0],
                conv_bn("conv1", "bn1", (in_channels, widths[0]), 3, *stem_stride),
                None,
            ),
            _ => (
                64,
                conv_bn("conv1", "bn1", (in_channels, 64), 7, 2),
                Some(Pool::Max3),
            ),
        };
        let mut units = vec![UnitSpec {
            name: "conv1".into(),
            convs: vec![stem],
            shortcut: Shortcut::None,
            pool,
        }];
        let expansion = if bottleneck { 4 } else { 1 };
        let mut in_ch = stem_width;
        for (stage, (&depth, &width)) in depths.iter().zip(&widths).enumerate() {
            for b in 0..depth {
                let stride = if b == 0 && stage > 0 { 2 } else { 1 };
                let p = format!("layer{}.{b}", stage + 1);
                let out_ch = width * expansion;
                let c = |i: usize, io, k, s| {
                    conv_bn(&format!("{p}.conv{i}"), &format!("{p}.bn{i}"), io, k, s)
                };
                let mut convs = match bottleneck {
                    true => vec![
                        c(1, (in_ch, width), 1, 1),
                        c(2, (width, width), 3, stride),
                        c(3, (width, out_ch), 1, 1),
                    ],
                    false => vec![c(1, (in_ch, width), 3, stride), c(2, (width, width), 3, 1)],
                };
                let shortcut = match stride != 1 || in_ch != out_ch {
                    true => {
                        let ds = |i| format!("{p}.downsample.{i}");
                        convs.push(
                            conv_bn(&ds(0), &ds(1), (in_ch, out_ch), 1, stride).act(Act::None),
                        );
                        Shortcut::Projection
                    }
                    false => Shortcut::Identity,
                };
                units.push(UnitSpec {
                    name: p,
                    convs,
                    shortcut,
                    pool: None,
                });
                in_ch = out_ch;
            }
        }
        units
    }

    /// VGG-16's 13 convs, one unit each, a max-pool after the last of each
    /// stage (but the fifth in the paper's CIFAR variant). torchvision numbers
    /// `features` layers in sequence: conv, ReLU (and BatchNorm between them with
    /// BN), pools between stages.
    fn vgg_units(&self, in_channels: usize) -> Vec<UnitSpec> {
        const STAGES: [(usize, usize); 5] = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)];
        let bn = matches!(self, Arch::Vgg16Bn);
        let mut units = Vec::new();
        let (mut index, mut in_ch) = (0, in_channels);
        for (stage, (width, depth)) in STAGES.into_iter().enumerate() {
            let pool = stage < 4 || !matches!(self, Arch::Vgg16Cifar);
            for i in 0..depth {
                let name = format!("features.{index}");
                let spec = ConvSpec {
                    bn: bn.then(|| format!("features.{}", index + 1)),
                    bias: true,
                    ..conv_bn(&name, "", (in_ch, width), 3, 1)
                };
                index += if bn { 3 } else { 2 };
                let last = i + 1 == depth;
                if last {
                    index += 1;
                }
                units.push(UnitSpec {
                    name,
                    convs: vec![spec],
                    shortcut: Shortcut::None,
                    pool: (last && pool).then_some(Pool::Max2),
                });
                in_ch = width;
            }
        }
        units
    }
}

/// A conv without bias, then BatchNorm and ReLU, padded `kernel / 2`.
fn conv_bn(conv: &str, bn: &str, (i, o): (usize, usize), kernel: usize, stride: usize) -> ConvSpec {
    ConvSpec {
        conv: conv.into(),
        bn: Some(bn.into()),
        bias: false,
        in_channels: i,
        out_channels: o,
        kernel,
        stride,
        padding: Padding::Symmetric(kernel / 2),
        groups: 1,
        act: Act::Relu,
    }
}

impl ConvSpec {
    fn act(self, act: Act) -> ConvSpec {
        ConvSpec { act, ..self }
    }

    fn depthwise(self) -> ConvSpec {
        ConvSpec {
            groups: self.in_channels,
            ..self
        }
    }

    fn same(self) -> ConvSpec {
        ConvSpec {
            padding: Padding::Same,
            ..self
        }
    }
}

/// An inverted residual block (MobileNetV2, EfficientNet-Lite): a 1×1 expansion
/// (when `expand` > 1), a depthwise conv, a linear 1×1 projection, and the
/// identity added when the shape allows. `names` gives each conv's and
/// BatchNorm's names in that order.
fn inverted_residual(
    name: String,
    (in_ch, out_ch): (usize, usize),
    (expand, kernel, stride): (usize, usize, usize),
    names: &[(String, String)],
    same: bool,
) -> UnitSpec {
    let hidden = in_ch * expand;
    let mut shapes = Vec::new();
    if expand != 1 {
        shapes.push(((in_ch, hidden), 1, 1, false));
    }
    shapes.push(((hidden, hidden), kernel, stride, true));
    shapes.push(((hidden, out_ch), 1, 1, false));
    let last = shapes.len() - 1;
    let convs = (shapes.into_iter().zip(names).enumerate())
        .map(|(i, ((io, k, s, dw), (c, b)))| {
            let spec = conv_bn(c, b, io, k, s).act(if i == last { Act::None } else { Act::Relu6 });
            let spec = if dw { spec.depthwise() } else { spec };
            if same { spec.same() } else { spec }
        })
        .collect();
    UnitSpec {
        name,
        convs,
        shortcut: match stride == 1 && in_ch == out_ch {
            true => Shortcut::Identity,
            false => Shortcut::None,
        },
        pool: None,
    }
}

/// torchvision's MobileNetV2 (width 1.0): `features.0` the stem, `features.1` to
/// `features.17` inverted residuals, `features.18` the 1×1 conv to 1280.
fn mobilenet_v2_units(in_channels: usize) -> Vec<UnitSpec> {
    // (expansion, channels, repeats, first stride)
    const SETTINGS: [(usize, usize, usize, usize); 7] = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ];
    let stem = conv_bn("features.0.0", "features.0.1", (in_channels, 32), 3, 2).act(Act::Relu6);
    let mut units = vec![single("features.0", stem)];
    let mut in_ch = 32;
    for (t, c, n, s) in SETTINGS {
        for r in 0..n {
            let p = format!("features.{}", units.len());
            // torchvision's `conv` Sequential: ConvBNActivation modules (`conv.i.0`
            // and `conv.i.1`), then the projection conv and its BatchNorm.
            let k = if t == 1 { 1 } else { 2 };
            let mut names: Vec<(String, String)> = (0..k)
                .map(|i| (format!("{p}.conv.{i}.0"), format!("{p}.conv.{i}.1")))
                .collect();
            names.push((format!("{p}.conv.{k}"), format!("{p}.conv.{}", k + 1)));
            let stride = if r == 0 { s } else { 1 };
            units.push(inverted_residual(
                p,
                (in_ch, c),
                (t, 3, stride),
                &names,
                false,
            ));
            in_ch = c;
        }
    }
    let head = conv_bn("features.18.0", "features.18.1", (in_ch, 1280), 1, 1).act(Act::Relu6);
    units.push(single("features.18", head));
    units
}

/// timm's `efficientnet_lite0`: `conv_stem`/`bn1`, seven stages of blocks
/// (`blocks.S.B`; the first stage depthwise-separable, the rest inverted
/// residuals), then `conv_head`/`bn2` to 1280.
fn efficientnet_lite0_units(in_channels: usize) -> Vec<UnitSpec> {
    // (expansion, kernel, first stride, channels, repeats)
    const STAGES: [(usize, usize, usize, usize, usize); 7] = [
        (1, 3, 1, 16, 1),
        (6, 3, 2, 24, 2),
        (6, 5, 2, 40, 2),
        (6, 3, 2, 80, 3),
        (6, 5, 1, 112, 3),
        (6, 5, 2, 192, 4),
        (6, 3, 1, 320, 1),
    ];
    let stem = conv_bn("conv_stem", "bn1", (in_channels, 32), 3, 2)
        .act(Act::Relu6)
        .same();
    let mut units = vec![single("conv_stem", stem)];
    let mut in_ch = 32;
    for (stage, (t, k, s, c, n)) in STAGES.into_iter().enumerate() {
        for b in 0..n {
            let p = format!("blocks.{stage}.{b}");
            let pair = |conv: &str, bn: usize| (format!("{p}.{conv}"), format!("{p}.bn{bn}"));
            let names = match t {
                1 => vec![pair("conv_dw", 1), pair("conv_pw", 2)],
                _ => vec![pair("conv_pw", 1), pair("conv_dw", 2), pair("conv_pwl", 3)],
            };
            let stride = if b == 0 { s } else { 1 };
            units.push(inverted_residual(
                p,
                (in_ch, c),
                (t, k, stride),
                &names,
                true,
            ));
            in_ch = c;
        }
    }
    let head = conv_bn("conv_head", "bn2", (in_ch, 1280), 1, 1)
        .act(Act::Relu6)
        .same();
    units.push(single("conv_head", head));
    units
}

/// A unit of one conv, without shortcut or pool.
fn single(name: &str, conv: ConvSpec) -> UnitSpec {
    UnitSpec {
        name: name.into(),
        convs: vec![conv],
        shortcut: Shortcut::None,
        pool: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parameters (running statistics excluded), as `model.parameters()` counts them.
    fn params(arch: &Arch, classes: usize) -> usize {
        (arch.tensor_shapes(3, classes).iter())
            .filter(|(n, _)| !n.contains("running"))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    fn has(arch: &Arch, name: &str, shape: &[usize]) -> bool {
        (arch.tensor_shapes(3, 1000).iter()).any(|(n, s)| n == name && s == shape)
    }

    #[test]
    fn resnets_match_torchvision_layout() {
        // torchvision.models.resnetNN().parameters() counts.
        assert_eq!(params(&Arch::ResNet18, 1000), 11_689_512);
        assert_eq!(params(&Arch::ResNet50, 1000), 25_557_032);
        assert!(has(
            &Arch::ResNet18,
            "layer2.0.downsample.0.weight",
            &[128, 64, 1, 1]
        ));
        assert!(has(
            &Arch::ResNet50,
            "layer1.0.downsample.0.weight",
            &[256, 64, 1, 1]
        ));
    }

    #[test]
    fn vggs_match_torchvision_layout() {
        assert_eq!(params(&Arch::Vgg16, 1000), 138_357_544);
        assert_eq!(params(&Arch::Vgg16Bn, 1000), 138_365_992);
        assert!(has(&Arch::Vgg16, "features.28.weight", &[512, 512, 3, 3]));
        assert!(has(&Arch::Vgg16Bn, "features.41.running_var", &[512]));
        assert!(has(&Arch::Vgg16Bn, "classifier.6.weight", &[1000, 4096]));
        assert_eq!(Arch::Vgg16.block_count(), 12);
        // The paper's: 13 convs and 10 classes on 32×32, 4 pools leave 2×2×512.
        assert_eq!(params(&Arch::Vgg16Cifar, 10), 14_719_818);
        assert!(has(&Arch::Vgg16Cifar, "features.28.bias", &[512]));
        let size = (Arch::Vgg16Cifar.units(3).iter()).fold((32, 32), |s, u| u.output_size(s));
        assert_eq!(size, (2, 2));
    }

    #[test]
    fn mobilenet_v2_matches_torchvision_layout() {
        assert_eq!(params(&Arch::MobileNetV2, 1000), 3_504_872);
        assert!(has(
            &Arch::MobileNetV2,
            "features.1.conv.0.0.weight",
            &[32, 1, 3, 3]
        ));
        assert!(has(
            &Arch::MobileNetV2,
            "features.1.conv.1.weight",
            &[16, 32, 1, 1]
        ));
        assert!(has(
            &Arch::MobileNetV2,
            "features.2.conv.3.running_mean",
            &[24]
        ));
        assert!(has(
            &Arch::MobileNetV2,
            "features.17.conv.2.weight",
            &[320, 960, 1, 1]
        ));
        assert!(has(
            &Arch::MobileNetV2,
            "classifier.1.weight",
            &[1000, 1280]
        ));
    }

    #[test]
    fn efficientnet_lite0_matches_timm_layout() {
        // timm.create_model("efficientnet_lite0").parameters() count.
        assert_eq!(params(&Arch::EfficientNetLite0, 1000), 4_652_008);
        assert!(has(
            &Arch::EfficientNetLite0,
            "blocks.0.0.conv_dw.weight",
            &[32, 1, 3, 3]
        ));
        assert!(has(
            &Arch::EfficientNetLite0,
            "blocks.2.1.conv_dw.weight",
            &[240, 1, 5, 5]
        ));
        assert!(has(
            &Arch::EfficientNetLite0,
            "blocks.6.0.conv_pwl.weight",
            &[320, 1152, 1, 1]
        ));
        assert!(has(
            &Arch::EfficientNetLite0,
            "conv_head.weight",
            &[1280, 320, 1, 1]
        ));
        let size =
            (Arch::EfficientNetLite0.units(3).iter()).fold((224, 224), |s, u| u.output_size(s));
        assert_eq!(size, (7, 7));
    }

    #[test]
    fn same_padding_puts_the_odd_zero_after() {
        assert_eq!(Padding::Same.amounts(224, 3, 2), (0, 1));
        assert_eq!(Padding::Same.amounts(112, 3, 1), (1, 1));
        assert_eq!(Padding::Same.amounts(28, 5, 2), (1, 2));
        assert_eq!(Padding::Same.output(224, 3, 2), 112);
        assert_eq!(Padding::Symmetric(1).output(224, 3, 2), 112);
    }
}
