//! Reading tensors' values in place for the host kernels (CPU, f32): the GLA steps, the
//! prefill pieces' attention. Lock the contiguous tensors with
//! `let guards = owned.each_ref().map(|t| t.storage_and_layout());`, then borrow their
//! values with [`f32_slices`].

use candle_core::{CpuStorage, Layout, Storage, Tensor};

use crate::Result;

/// Whether every tensor can be read on the host: f32 on the CPU, and no gradient to carry
/// (the host kernels have no backward pass).
pub(crate) fn applies(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && !t.track_op())
}

/// `tensors`, each made contiguous (a copy only where one is not), to lock and read with
/// [`f32_slices`].
pub(crate) fn contiguous<const N: usize>(tensors: [&Tensor; N]) -> Result<[Tensor; N]> {
    let owned = tensors
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(owned.try_into().expect("one tensor per input"))
}

/// The values of every locked tensor (contiguous, f32, on the CPU); an error otherwise.
pub(crate) fn f32_slices<'a, G: std::ops::Deref<Target = Storage>, const N: usize>(
    guards: &'a [(G, &Layout); N],
) -> Result<[&'a [f32]; N]> {
    let slices = guards.iter().map(f32_slice).collect::<Result<Vec<_>>>()?;
    Ok(slices.try_into().expect("one slice per guard"))
}

fn f32_slice<'a, G: std::ops::Deref<Target = Storage>>(
    (storage, layout): &'a (G, &Layout),
) -> Result<&'a [f32]> {
    let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) =
        (&**storage, layout.contiguous_offsets())
    else {
        return Err(crate::Error::State(
            "a host kernel expected contiguous f32 values on the CPU".into(),
        ));
    };
    Ok(&data[start..end])
}
