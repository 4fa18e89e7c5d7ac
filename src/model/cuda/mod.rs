//! sac's own CUDA kernels, compiled to PTX by `build.rs` with the `cuda`
//! feature and loaded by the driver on first use, and how a CUDA device is
//! set up.

use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Device, Layout, Shape, Tensor};

const MASKED_SOFTMAX: &str = include_str!(concat!(env!("OUT_DIR"), "/masked_softmax.ptx"));

/// Has `device`'s default memory pool keep the memory freed tensors give
/// back instead of returning it to the driver at every synchronisation (its
/// release threshold is 0 unless set), which makes the next allocations map
/// memory again: candle allocates a tensor for every op, and a compression
/// synchronises once a chunk. The pool then holds the pass's peak, as
/// PyTorch's caching allocator does.
pub fn keep_freed_memory(device: &Device) -> candle_core::Result<()> {
    let Device::Cuda(cuda) = device else {
        return Ok(());
    };
    let ordinal = cuda.cuda_stream().context().cu_device();
    let mut pool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: `pool` receives the device's default pool; the release
    // threshold attribute takes a pointer to a u64.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ordinal)
            .result()
            .w()?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&raw mut threshold).cast(),
        )
        .result()
        .w()
    }
}

/// `softmax(scores + mask)` over the last dimension, accumulated in f32 and
/// returned in the scores' dtype, in one pass of one kernel. `scores` is
/// `[batch, .., keys]` whose rows are the `seq` queries repeated (row r is
/// query `r % seq`); `mask`, f32 `[batch | 1, .., seq, keys]`. A row that
/// sees no key gets zeros.
pub fn masked_softmax(
    scores: &Tensor,
    mask: Option<&Tensor>,
    seq: usize,
) -> candle_core::Result<Tensor> {
    let op = MaskedSoftmax {
        seq,
        batch: scores.dim(0)?,
    };
    match mask {
        Some(mask) => scores.apply_op2_no_bwd(mask, &op),
        None => scores.apply_op1_no_bwd(&op),
    }
}

struct MaskedSoftmax {
    seq: usize,
    batch: usize,
}

impl MaskedSoftmax {
    fn run(
        &self,
        scores: &CudaStorage,
        layout: &Layout,
        mask: Option<(&CudaSlice<f32>, &Layout)>,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = &scores.device;
        let slice = match &scores.slice {
            CudaStorageSlice::F32(x) => {
                CudaStorageSlice::F32(self.launch(dev, "masked_softmax_f32", x, layout, mask)?)
            }
            CudaStorageSlice::BF16(x) => {
                CudaStorageSlice::BF16(self.launch(dev, "masked_softmax_bf16", x, layout, mask)?)
            }
            CudaStorageSlice::F16(x) => {
                CudaStorageSlice::F16(self.launch(dev, "masked_softmax_f16", x, layout, mask)?)
            }
            _ => candle_core::bail!("masked_softmax takes f32, bf16 or f16 scores"),
        };
        let out = CudaStorage {
            slice,
            device: dev.clone(),
        };
        Ok((out, layout.shape().clone()))
    }

    fn launch<T: DeviceRepr>(
        &self,
        dev: &CudaDevice,
        name: &str,
        scores: &CudaSlice<T>,
        layout: &Layout,
        mask: Option<(&CudaSlice<f32>, &Layout)>,
    ) -> candle_core::Result<CudaSlice<T>> {
        let contiguous = |l: &Layout, what: &str| {
            l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg(format!("masked_softmax: {what} must be contiguous"))
            })
        };
        let (start, end) = contiguous(layout, "the scores")?;
        let scores = scores.slice(start..end);
        let elements = layout.shape().elem_count();
        let cols = layout.dims().last().copied().unwrap_or(1).max(1);
        let rows = elements / cols;
        if rows == 0 || self.seq == 0 {
            // SAFETY: nothing to write.
            return Ok(unsafe { dev.alloc::<T>(elements)? });
        }
        let mask = match mask {
            Some((m, l)) => {
                let (start, end) = contiguous(l, "the mask")?;
                let batches = l.dims().first().copied().unwrap_or(1);
                let fits = end - start == batches * self.seq * cols
                    && (batches == 1 || batches == self.batch);
                if !fits {
                    candle_core::bail!(
                        "masked_softmax: a mask of shape {:?} does not fit {} queries of {cols} keys",
                        l.dims(),
                        self.seq
                    );
                }
                Some((m.slice(start..end), batches))
            }
            None => None,
        };
        if !rows.is_multiple_of(self.seq) || !rows.is_multiple_of(self.batch) {
            candle_core::bail!(
                "masked_softmax: {rows} rows are not whole batches of {} queries",
                self.seq
            );
        }
        let func = dev.get_or_load_custom_func(name, "sac_masked_softmax", MASKED_SOFTMAX)?;
        // SAFETY: every element is written by the kernel below.
        let out = unsafe { dev.alloc::<T>(elements)? };
        let no_mask = 0u64;
        let mut builder = func.builder();
        builder.arg(&scores);
        match &mask {
            Some((m, _)) => builder.arg(m),
            None => builder.arg(&no_mask),
        };
        builder.arg(&out);
        let batches = mask.as_ref().map_or(1, |(_, b)| *b);
        candle_core::builder_arg!(
            builder,
            cols as i32,
            self.seq as i32,
            (rows / self.batch) as i32,
            batches as i32
        );
        let config = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's, and the lengths were checked.
        unsafe { builder.launch(config) }.w()?;
        Ok(out)
    }
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("masked_softmax runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        scores: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.run(scores, layout, None)
    }
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("masked_softmax runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        scores: &CudaStorage,
        layout: &Layout,
        mask: &CudaStorage,
        mask_layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let CudaStorageSlice::F32(m) = &mask.slice else {
            candle_core::bail!("masked_softmax takes an f32 mask");
        };
        self.run(scores, layout, Some((m, mask_layout)))
    }
}
