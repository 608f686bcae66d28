//! The delta format: a set of named f32 tensors with shapes.
//!
//! A [`Delta`] is what a trainer sends back (adapter after minus adapter before) and also how an
//! adapter itself is carried. Tensors are kept sorted by name, which makes the canonical byte
//! encoding (see [`crate::codec`]) and every aggregation order-independent.

use serde::{Deserialize, Serialize};

/// One named tensor: row-major f32 values with a shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NamedTensor {
    name: String,
    shape: Vec<usize>,
    values: Vec<f32>,
}

impl NamedTensor {
    /// Builds a tensor, checking that `values.len()` is the product of `shape`.
    pub fn new(
        name: impl Into<String>,
        shape: Vec<usize>,
        values: Vec<f32>,
    ) -> Result<Self, DeltaError> {
        let name = name.into();
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(DeltaError::BadName { name });
        }
        let expected = element_count(&shape).ok_or_else(|| DeltaError::ShapeOverflow {
            name: name.clone(),
            shape: shape.clone(),
        })?;
        if expected != values.len() {
            return Err(DeltaError::LengthMismatch {
                name,
                expected,
                actual: values.len(),
            });
        }
        Ok(Self {
            name,
            shape,
            values,
        })
    }

    /// A tensor of zeros with the given shape.
    pub fn zeros(name: impl Into<String>, shape: Vec<usize>) -> Result<Self, DeltaError> {
        let len = element_count(&shape).unwrap_or(usize::MAX);
        if len > MAX_ELEMENTS {
            return Err(DeltaError::TooLarge { elements: len });
        }
        Self::new(name, shape, vec![0.0; len])
    }

    /// The tensor's name, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tensor's shape (row-major).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The values, row-major.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Mutable access to the values; the length cannot change.
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// Consumes the tensor, returning its values.
    pub fn into_values(self) -> Vec<f32> {
        self.values
    }
}

/// Longest tensor name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 512;
/// Most elements accepted in one delta (all tensors together): 2^31, 8 GiB as f32.
pub const MAX_ELEMENTS: usize = 1 << 31;

/// A set of named tensors, sorted by name, names unique.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct Delta {
    tensors: Vec<NamedTensor>,
}

impl Delta {
    /// Builds a delta from tensors in any order; rejects duplicate names.
    pub fn new(mut tensors: Vec<NamedTensor>) -> Result<Self, DeltaError> {
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        for pair in tensors.windows(2) {
            if pair[0].name == pair[1].name {
                return Err(DeltaError::DuplicateName {
                    name: pair[0].name.clone(),
                });
            }
        }
        let total: usize = tensors.iter().map(|t| t.values.len()).sum();
        if total > MAX_ELEMENTS {
            return Err(DeltaError::TooLarge { elements: total });
        }
        Ok(Self { tensors })
    }

    /// The tensors, sorted by name.
    pub fn tensors(&self) -> &[NamedTensor] {
        &self.tensors
    }

    /// Mutable access to the tensors (names and shapes stay fixed).
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut NamedTensor> {
        self.tensors.iter_mut()
    }

    /// Consumes the delta, returning its tensors sorted by name.
    pub fn into_tensors(self) -> Vec<NamedTensor> {
        self.tensors
    }

    /// Looks a tensor up by name.
    pub fn get(&self, name: &str) -> Option<&NamedTensor> {
        self.tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
            .map(|index| &self.tensors[index])
    }

    /// Total number of f32 values.
    pub fn element_count(&self) -> usize {
        self.tensors.iter().map(|t| t.values.len()).sum()
    }

    /// The layout (names and shapes) without values.
    pub fn layout(&self) -> Layout {
        Layout {
            tensors: self
                .tensors
                .iter()
                .map(|t| (t.name.clone(), t.shape.clone()))
                .collect(),
        }
    }

    /// A delta of zeros with the given layout.
    pub fn zeros(layout: &Layout) -> Result<Self, DeltaError> {
        let tensors = layout
            .tensors
            .iter()
            .map(|(name, shape)| NamedTensor::zeros(name.clone(), shape.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(tensors)
    }

    /// Checks that every value is finite (no NaN, no infinity).
    pub fn check_finite(&self) -> Result<(), DeltaError> {
        for tensor in &self.tensors {
            if let Some(index) = tensor.values.iter().position(|v| !v.is_finite()) {
                return Err(DeltaError::NonFinite {
                    name: tensor.name.clone(),
                    index,
                });
            }
        }
        Ok(())
    }

    /// Checks that this delta has exactly the names and shapes of `layout`.
    pub fn check_layout(&self, layout: &Layout) -> Result<(), DeltaError> {
        if self.tensors.len() != layout.tensors.len() {
            return Err(DeltaError::LayoutMismatch {
                detail: format!(
                    "{} tensors, expected {}",
                    self.tensors.len(),
                    layout.tensors.len()
                ),
            });
        }
        for (tensor, (name, shape)) in self.tensors.iter().zip(&layout.tensors) {
            if &tensor.name != name {
                return Err(DeltaError::LayoutMismatch {
                    detail: format!("tensor {:?} where {name:?} was expected", tensor.name),
                });
            }
            if &tensor.shape != shape {
                return Err(DeltaError::LayoutMismatch {
                    detail: format!(
                        "tensor {name:?} has shape {:?}, expected {shape:?}",
                        tensor.shape
                    ),
                });
            }
        }
        Ok(())
    }

    /// The Euclidean norm over all values, accumulated in f64 in a fixed order.
    pub fn l2_norm(&self) -> f64 {
        self.tensors
            .iter()
            .flat_map(|t| t.values.iter())
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt()
    }

    /// Adds `other` into `self` element-wise, scaled by `scale`. Layouts must match.
    pub fn add_scaled(&mut self, other: &Delta, scale: f32) -> Result<(), DeltaError> {
        other.check_layout(&self.layout())?;
        for (mine, theirs) in self.tensors.iter_mut().zip(&other.tensors) {
            for (a, b) in mine.values.iter_mut().zip(&theirs.values) {
                *a += scale * b;
            }
        }
        Ok(())
    }
}

/// Names and shapes of a delta's tensors, sorted by name.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Layout {
    /// `(name, shape)` pairs sorted by name.
    pub tensors: Vec<(String, Vec<usize>)>,
}

impl Layout {
    /// Builds a layout, sorting by name.
    pub fn new(mut tensors: Vec<(String, Vec<usize>)>) -> Self {
        tensors.sort();
        Self { tensors }
    }

    /// Total number of elements.
    pub fn element_count(&self) -> usize {
        self.tensors
            .iter()
            .map(|(_, shape)| element_count(shape).unwrap_or(usize::MAX))
            .fold(0usize, usize::saturating_add)
    }
}

/// A delta or tensor that is not well formed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DeltaError {
    /// The values do not fill the shape.
    #[error("tensor {name:?} has {actual} values, its shape needs {expected}")]
    LengthMismatch {
        /// Tensor name.
        name: String,
        /// Product of the shape.
        expected: usize,
        /// Number of values given.
        actual: usize,
    },
    /// The shape's product overflows.
    #[error("tensor {name:?} has an impossible shape {shape:?}")]
    ShapeOverflow {
        /// Tensor name.
        name: String,
        /// The shape.
        shape: Vec<usize>,
    },
    /// Empty or overlong name.
    #[error("bad tensor name {name:?}")]
    BadName {
        /// The name.
        name: String,
    },
    /// Two tensors share a name.
    #[error("duplicate tensor name {name:?}")]
    DuplicateName {
        /// The name.
        name: String,
    },
    /// Too many elements in total.
    #[error("delta has {elements} elements, more than the limit")]
    TooLarge {
        /// Element count.
        elements: usize,
    },
    /// A NaN or infinite value.
    #[error("tensor {name:?} has a non-finite value at index {index}")]
    NonFinite {
        /// Tensor name.
        name: String,
        /// Flat index of the first bad value.
        index: usize,
    },
    /// Names or shapes differ from the expected layout.
    #[error("wrong layout: {detail}")]
    LayoutMismatch {
        /// What differs.
        detail: String,
    },
}

/// The product of `shape`, or `None` on overflow. An empty shape is a scalar (1 element).
pub fn element_count(shape: &[usize]) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &dim| acc.checked_mul(dim))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, shape: Vec<usize>, values: Vec<f32>) -> NamedTensor {
        NamedTensor::new(name, shape, values).unwrap()
    }

    #[test]
    fn sorted_and_unique() {
        let delta = Delta::new(vec![
            tensor("b", vec![1], vec![1.0]),
            tensor("a", vec![2], vec![1.0, 2.0]),
        ])
        .unwrap();
        assert_eq!(delta.tensors()[0].name(), "a");
        assert_eq!(delta.get("b").unwrap().values(), &[1.0]);
        let duplicate = Delta::new(vec![
            tensor("a", vec![1], vec![1.0]),
            tensor("a", vec![1], vec![2.0]),
        ]);
        assert!(matches!(duplicate, Err(DeltaError::DuplicateName { .. })));
    }

    #[test]
    fn rejects_bad_shapes_and_values() {
        assert!(matches!(
            NamedTensor::new("x", vec![2, 2], vec![0.0; 3]),
            Err(DeltaError::LengthMismatch { .. })
        ));
        assert!(matches!(
            NamedTensor::new("x", vec![usize::MAX, 2], vec![]),
            Err(DeltaError::ShapeOverflow { .. })
        ));
        let delta = Delta::new(vec![tensor("x", vec![2], vec![1.0, f32::NAN])]).unwrap();
        assert_eq!(
            delta.check_finite(),
            Err(DeltaError::NonFinite {
                name: "x".into(),
                index: 1
            })
        );
    }

    #[test]
    fn layout_check_names_the_difference() {
        let delta = Delta::new(vec![tensor("x", vec![2], vec![1.0, 2.0])]).unwrap();
        let other = Layout::new(vec![("x".into(), vec![1, 2])]);
        let err = delta.check_layout(&other).unwrap_err();
        assert!(err.to_string().contains("shape [2]"), "{err}");
        assert!(delta.check_layout(&delta.layout()).is_ok());
    }
}
