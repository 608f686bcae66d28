//! A round's deltas, flattened, kept while the round is derived: in memory up to a limit, past
//! it in an unnamed scratch file, so that aggregation's memory follows a budget instead of the
//! number of trainers.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;

use tributary_shared::aggregate::Rows;
use tributary_shared::{Delta, Layout, NamedTensor};

/// Where and how much a derivation may keep of a round's deltas.
#[derive(Clone, Debug)]
pub struct Scratch {
    /// The folder for the scratch file (unnamed: removed with the process, whatever happens).
    pub dir: PathBuf,
    /// Bytes of delta values kept in memory; a round with more goes to the scratch file.
    pub in_memory: usize,
    /// Bytes of values aggregation reads at once (one slab of coordinates of every delta).
    pub slab: usize,
}

impl Scratch {
    /// The defaults, with the scratch file in `dir`: up to 256 MiB of values in memory, slabs of
    /// 64 MiB.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            in_memory: 256 << 20,
            slab: 64 << 20,
        }
    }
}

/// Flattened deltas of one layout, one row each.
pub struct Spill {
    elements: usize,
    rows: usize,
    storage: Storage,
    bytes: Vec<u8>,
}

enum Storage {
    Memory(Vec<f32>),
    File(File),
}

impl Spill {
    /// Room for `expected_rows` deltas of `elements` values: in memory when they fit
    /// `scratch.in_memory`, else in a scratch file under `scratch.dir`.
    pub fn new(elements: usize, expected_rows: usize, scratch: &Scratch) -> io::Result<Self> {
        let total = elements
            .saturating_mul(expected_rows)
            .saturating_mul(std::mem::size_of::<f32>());
        let storage = if total <= scratch.in_memory {
            Storage::Memory(Vec::with_capacity(elements * expected_rows))
        } else {
            Storage::File(tempfile::tempfile_in(&scratch.dir)?)
        };
        Ok(Self {
            elements,
            rows: 0,
            storage,
            bytes: Vec::new(),
        })
    }

    /// Whether the rows live in a scratch file.
    pub fn on_disk(&self) -> bool {
        matches!(self.storage, Storage::File(_))
    }

    /// Appends `delta` (of this spill's element count) as the next row; its index.
    pub fn push(&mut self, delta: &Delta) -> io::Result<usize> {
        if delta.element_count() != self.elements {
            return Err(io::Error::other(format!(
                "a delta of {} values in a spill of {}",
                delta.element_count(),
                self.elements
            )));
        }
        let row = self.rows;
        let offset = self.offset(row, 0);
        match &mut self.storage {
            Storage::Memory(values) => {
                for tensor in delta.tensors() {
                    values.extend_from_slice(tensor.values());
                }
            }
            Storage::File(file) => {
                self.bytes.clear();
                for tensor in delta.tensors() {
                    for value in tensor.values() {
                        self.bytes.extend_from_slice(&value.to_le_bytes());
                    }
                }
                file.write_all_at(&self.bytes, offset)?;
            }
        }
        self.rows += 1;
        Ok(row)
    }

    /// Row `row`'s values at coordinates `start..start + out.len()`.
    pub fn read(&mut self, row: usize, start: usize, out: &mut [f32]) -> io::Result<()> {
        if row >= self.rows || start + out.len() > self.elements {
            return Err(io::Error::other(format!(
                "row {row}, coordinates {start}..{} are outside the spill",
                start + out.len()
            )));
        }
        let offset = self.offset(row, start);
        match &mut self.storage {
            Storage::Memory(values) => {
                let begin = row * self.elements + start;
                out.copy_from_slice(&values[begin..begin + out.len()]);
            }
            Storage::File(file) => {
                self.bytes.resize(std::mem::size_of_val(out), 0);
                file.read_exact_at(&mut self.bytes, offset)?;
                for (value, bytes) in out.iter_mut().zip(self.bytes.chunks_exact(4)) {
                    *value = f32::from_le_bytes(bytes.try_into().expect("four bytes"));
                }
            }
        }
        Ok(())
    }

    /// Row `row` as a delta of `layout`.
    pub fn delta(&mut self, row: usize, layout: &Layout) -> io::Result<Delta> {
        let mut values = vec![0.0f32; self.elements];
        self.read(row, 0, &mut values)?;
        let mut tensors = Vec::with_capacity(layout.tensors.len());
        let mut rest = values.as_slice();
        for (name, shape) in &layout.tensors {
            let len = shape.iter().product::<usize>().min(rest.len());
            let (mine, after) = rest.split_at(len);
            rest = after;
            tensors.push(
                NamedTensor::new(name.clone(), shape.clone(), mine.to_vec())
                    .map_err(io::Error::other)?,
            );
        }
        Delta::new(tensors).map_err(io::Error::other)
    }

    fn offset(&self, row: usize, start: usize) -> u64 {
        ((row * self.elements + start) * std::mem::size_of::<f32>()) as u64
    }
}

/// Some of a spill's rows, as aggregation reads them.
pub struct SpillRows<'a> {
    /// The spill.
    pub spill: &'a mut Spill,
    /// The spill row of each contribution, in aggregation order.
    pub rows: Vec<usize>,
}

impl Rows for SpillRows<'_> {
    fn read(&mut self, index: usize, start: usize, out: &mut [f32]) -> Result<(), String> {
        let row = *self
            .rows
            .get(index)
            .ok_or_else(|| format!("no contribution {index}"))?;
        self.spill
            .read(row, start, out)
            .map_err(|error| format!("scratch file: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(values: &[f32]) -> Delta {
        Delta::new(vec![
            NamedTensor::new("b", vec![1], values[2..].to_vec()).unwrap(),
            NamedTensor::new("a", vec![2], values[..2].to_vec()).unwrap(),
        ])
        .unwrap()
    }

    #[test]
    fn rows_read_back_the_same_from_memory_and_from_a_scratch_file() {
        let dir = tempfile::tempdir().unwrap();
        let deltas = [
            delta(&[1.0, -0.0, 3.5]),
            delta(&[f32::MIN_POSITIVE, 2.0, -7.25]),
        ];
        for in_memory in [usize::MAX, 0] {
            let scratch = Scratch {
                in_memory,
                ..Scratch::in_dir(dir.path())
            };
            let mut spill = Spill::new(3, deltas.len(), &scratch).unwrap();
            assert_eq!(spill.on_disk(), in_memory == 0);
            for (i, d) in deltas.iter().enumerate() {
                assert_eq!(spill.push(d).unwrap(), i);
            }
            let mut out = [0.0f32; 2];
            spill.read(1, 1, &mut out).unwrap();
            assert_eq!(
                out.map(f32::to_bits),
                [2.0f32.to_bits(), (-7.25f32).to_bits()]
            );
            let back = spill.delta(0, &deltas[0].layout()).unwrap();
            assert_eq!(back, deltas[0]);
            assert_eq!(back.tensors()[0].values()[1].to_bits(), (-0.0f32).to_bits());
            assert!(spill.read(2, 0, &mut out).is_err());
            assert!(spill.read(0, 2, &mut out).is_err());
            assert!(spill.push(&Delta::new(Vec::new()).unwrap()).is_err());
        }
        // The scratch file has no name: nothing is left in the folder.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
