//! Matrix products with a frozen right-hand side: the backward pass computes the gradient of
//! the activations only.
//!
//! candle's own matmul backward always computes both operands' gradients, even for a weight
//! that is a plain (untracked) tensor, which costs as much as the activation gradient and
//! allocates a weight-sized buffer per layer. Calibration needs dL/dK and dL/dV only, so the
//! decoder's linear layers go through [`matmul`], whose backward skips the weight.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// `x · w`, exactly as `x.matmul(w)`; when `x` is tracked, the backward pass propagates into
/// `x` only (`w` must not require a gradient: it is treated as a constant).
pub fn matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return x.matmul(w);
    }
    // The product is computed by candle's matmul on the detached input; the op below only
    // attaches a backward to it.
    let y = x.detach().matmul(w)?;
    x.apply_op1(FrozenRhs { w: w.clone(), y })
}

struct FrozenRhs {
    w: Tensor,
    /// The forward result, already computed.
    y: Tensor,
}

impl CustomOp1 for FrozenRhs {
    fn name(&self) -> &'static str {
        "matmul-frozen-rhs"
    }

    fn cpu_fwd(&self, _storage: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.y.contiguous()?;
        let (storage, layout) = y.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("frozen matmul runs on the CPU only");
        };
        let data = cpu.as_slice::<f32>()?;
        let (start, end) = layout.contiguous_offsets().expect("made contiguous above");
        Ok((
            CpuStorage::F32(data[start..end].to_vec()),
            layout.shape().clone(),
        ))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.w.t()?)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn forward_equals_matmul_and_gradient_reaches_only_the_input() {
        let dev = Device::Cpu;
        let x = Var::from_vec(
            (0..6).map(|i| i as f32 * 0.5 - 1.0).collect::<Vec<_>>(),
            (2, 3),
            &dev,
        )
        .unwrap();
        let w = Tensor::from_vec(
            (0..12).map(|i| (i as f32).sin()).collect::<Vec<_>>(),
            (3, 4),
            &dev,
        )
        .unwrap();
        let plain = x.as_tensor().detach().matmul(&w).unwrap();
        let frozen = matmul(x.as_tensor(), &w).unwrap();
        assert_eq!(
            plain.to_vec2::<f32>().unwrap(),
            frozen.to_vec2::<f32>().unwrap()
        );

        // d(sum(y²))/dx = 2·y·wᵀ, the same as candle's own backward.
        let grads = frozen.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        let reference = x
            .as_tensor()
            .matmul(&w)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let r = reference
            .get(x.as_tensor())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (a, b) in g.iter().flatten().zip(r.iter().flatten()) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
        assert!(
            grads.get(&w).is_none(),
            "the frozen weight gets no gradient"
        );
    }

    #[test]
    fn untracked_inputs_take_the_plain_path() {
        let dev = Device::Cpu;
        let x = Tensor::ones((2, 3), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::ones((3, 2), candle_core::DType::F32, &dev).unwrap();
        let y = matmul(&x, &w).unwrap();
        assert!(!y.track_op());
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![3.0, 3.0]; 2]);
    }
}
