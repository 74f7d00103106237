//! Image corruptions in the manner of ImageNet-C / MNIST-C.
