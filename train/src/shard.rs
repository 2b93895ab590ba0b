//! Data parallelism inside one process: a batch split into one shard per core, each shard's forward and
//! backward run on its own core, the gradients summed.
//!
//! Why: the transformer stages' tensors are small (a 64-sample batch of 16 tokens × 128 channels), so
//! candle's own parallelism — each matmul and element-wise op split across the cores, with a barrier after
//! each — spends more on synchronising than it gains: a teacher step took as long on one thread as on two.
//! Two single-threaded halves of the batch, one per core, keep both cores busy with no barrier until the
//! gradients are summed. The VAE's step is split the same way
//! ([`crate::vae::TrainableVae::batch_backward`]): its element-wise ops (GroupNorm, SiLU) on 32×32 crops
//! ran one core at a time between convolutions. The loss is a mean over samples, so the shards' losses
//! weighted by their share of the batch sum to the whole batch's loss, and their gradients to its
//! gradient; only f32 rounding differs.
//!
//! The shards run on rayon's global pool (the one candle's matmuls use), so a matmul inside a shard finds
//! the other core busy with the other shard and runs inline instead of oversubscribing the cores.
//! `pixart-train` also sets `CANDLE_NUM_THREADS=1` (see its `main`), which makes candle's element-wise ops
//! run on the calling thread rather than through its barrier pool, whose one lock would serialise the
//! shards.

use std::ops::Range;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rayon::prelude::*;

use crate::Result;

/// Settles the process's thread configuration for sharded training: `CANDLE_NUM_THREADS=1` unless set
/// (candle's element-wise ops on the calling thread: its barrier pool runs one op at a time, and with two
/// shards calling it each would wait for the other's; every training stage's step is sharded, and the
/// evaluation's sampling measured 0.89–0.90× its time without the setting), then
/// [`pixart::threads::settle`] (matmuls keep candle's default thread count). Neither changes a result:
/// element-wise ops compute each element the same way on any thread (the VAE a chain trains with it is
/// byte-identical to one trained without).
///
/// # Safety
///
/// Mutates the process environment: call it first in `main`, before any other thread exists.
#[allow(unsafe_code)]
pub unsafe fn settle_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: the caller guarantees that no other thread exists yet.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    // SAFETY: as above.
    unsafe { pixart::threads::settle() };
}

/// Splits `batch` samples into at most `shards` contiguous, non-empty ranges of near-equal size.
pub fn ranges(batch: usize, shards: usize) -> Vec<Range<usize>> {
    let shards = shards.clamp(1, batch.max(1));
    let (base, extra) = (batch / shards, batch % shards);
    let mut start = 0;
    (0..shards)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .filter(|r| !r.is_empty())
        .collect()
}

/// One shard per core candle would use (its thread count), at most one per sample.
pub fn default_shards(batch: usize) -> Vec<Range<usize>> {
    ranges(batch, candle_core::utils::get_num_threads())
}

/// What one shard's forward returns: its loss (a mean over its samples) and whatever else the step
/// records from it.
pub struct ShardLoss<T> {
    pub loss: Tensor,
    pub extra: T,
}

/// Runs `forward` on every shard of a `batch`-sample batch concurrently, back-propagates each shard's loss
/// weighted by its share of the batch, and returns the gradients of `vars` summed over the shards (`None`
/// when a shard's loss is not finite: nothing is back-propagated then, and the caller reports the loss),
/// with each shard's result in shard order. A single shard runs on the calling thread without the pool.
pub fn backward<T: Send>(
    batch: usize,
    shards: &[Range<usize>],
    vars: &[(String, Var)],
    forward: impl Fn(Range<usize>) -> Result<ShardLoss<T>> + Sync,
) -> Result<(Option<GradStore>, Vec<ShardLoss<T>>)> {
    let run = |r: &Range<usize>| -> Result<(Option<GradStore>, ShardLoss<T>)> {
        let out = forward(r.clone())?;
        let grads = if out.loss.to_scalar::<f32>()?.is_finite() {
            Some((&out.loss * (r.len() as f64 / batch as f64))?.backward()?)
        } else {
            None
        };
        Ok((grads, out))
    };
    let results: Vec<(Option<GradStore>, ShardLoss<T>)> = if shards.len() == 1 {
        vec![run(&shards[0])?]
    } else {
        shards.par_iter().map(run).collect::<Result<Vec<_>>>()?
    };
    let mut summed: Option<GradStore> = None;
    let mut finite = true;
    let mut outs = Vec::with_capacity(results.len());
    for (grads, out) in results {
        outs.push(out);
        let Some(other) = grads else {
            finite = false;
            continue;
        };
        let Some(sum) = summed.as_mut() else {
            summed = Some(other);
            continue;
        };
        for (_, var) in vars {
            if let Some(g) = other.get(var.as_tensor()) {
                let total = match sum.get(var.as_tensor()) {
                    Some(mine) => (mine + g)?,
                    None => g.clone(),
                };
                sum.insert(var.as_tensor(), total);
            }
        }
    }
    Ok((summed.filter(|_| finite), outs))
}

/// The batch's loss from its shards' (each a mean over its samples): their mean weighted by shard size.
pub fn combine(batch: usize, shards: &[Range<usize>], values: &[f32]) -> f32 {
    shards
        .iter()
        .zip(values)
        .map(|(r, v)| v * (r.len() as f32 / batch as f32))
        .sum()
}

/// The batch's loss from its shards' [`ShardLoss::loss`] values ([`combine`]).
pub fn batch_loss<T>(batch: usize, shards: &[Range<usize>], outs: &[ShardLoss<T>]) -> Result<f32> {
    let values = outs
        .iter()
        .map(|o| o.loss.to_scalar::<f32>())
        .collect::<candle_core::Result<Vec<f32>>>()?;
    Ok(combine(batch, shards, &values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_the_batch_in_order() {
        assert_eq!(ranges(64, 2), vec![0..32, 32..64]);
        assert_eq!(ranges(5, 2), vec![0..3, 3..5]);
        assert_eq!(ranges(1, 4), vec![0..1]);
        assert_eq!(ranges(7, 1), vec![0..7]);
        assert_eq!(ranges(0, 2), Vec::<Range<usize>>::new());
    }

    /// Two shards' weighted gradients sum to the whole batch's gradient (a mean-squared loss over a linear
    /// map, so only rounding differs), on the pool and on one thread.
    #[test]
    fn sharded_gradients_sum_to_the_batch_gradient() -> Result<()> {
        use candle_core::{D, Device};
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 4), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, 4, &dev)?)?;
        let vars = vec![("w".to_string(), w.clone()), ("b".to_string(), b.clone())];
        let x = Tensor::randn(0f32, 1.0, (7, 3), &dev)?;
        let target = Tensor::randn(0f32, 1.0, (7, 4), &dev)?;
        let loss_of = |r: Range<usize>| -> Result<Tensor> {
            let x = x.narrow(0, r.start, r.len())?;
            let y = x.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?;
            let t = target.narrow(0, r.start, r.len())?;
            Ok((y - t)?.sqr()?.mean(D::Minus1)?.mean_all()?)
        };
        let whole = loss_of(0..7)?;
        let reference = whole.backward()?;
        for shards in [ranges(7, 2), ranges(7, 3), ranges(7, 1)] {
            let (grads, outs) = backward(7, &shards, &vars, |r| {
                Ok(ShardLoss {
                    loss: loss_of(r.clone())?,
                    extra: r.len(),
                })
            })?;
            let grads = grads.expect("finite losses give gradients");
            let combined = batch_loss(7, &shards, &outs)?;
            // Relative bounds: the loss and gradients are O(1–10) and f32 sums in another order differ by ulps.
            let want = whole.to_scalar::<f32>()?;
            assert!(
                (combined - want).abs() <= 2e-6 * want.abs().max(1.0),
                "{shards:?}: {combined} vs {want}"
            );
            assert_eq!(outs.iter().map(|o| o.extra).sum::<usize>(), 7);
            for (name, var) in &vars {
                let ours = grads
                    .get(var.as_tensor())
                    .expect("every var has a gradient");
                let theirs = reference.get(var.as_tensor()).expect("reference gradient");
                let err = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let scale = theirs.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(err <= 2e-6 * scale.max(1.0), "{name} {shards:?}: {err}");
            }
        }
        Ok(())
    }

    /// A shard whose loss is NaN gives no gradients, whatever the other shards give.
    #[test]
    fn a_nan_shard_gives_no_gradients() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let w = Var::from_tensor(&Tensor::ones(2, candle_core::DType::F32, &dev)?)?;
        let vars = vec![("w".to_string(), w.clone())];
        let (grads, outs) = backward(4, &ranges(4, 2), &vars, |r| {
            let scale = if r.start == 0 { 1.0 } else { f64::NAN };
            Ok(ShardLoss {
                loss: (w.as_tensor().sum_all()? * scale)?,
                extra: (),
            })
        })?;
        assert!(grads.is_none());
        assert_eq!(outs.len(), 2);
        Ok(())
    }
}
