//! CALIB.json and PLAN.json: the versioned files between `fit`/`calibrate`, `allocate` and the
//! engines that apply a plan. The field-by-field description is `docs/formats.md`.
//!
//! Loading checks the format tag and version before anything else, then the fields (serde names
//! the missing or mistyped field and its line), then the meaning (lengths, ranges, duplicate
//! units); every error names the file. Saving is atomic.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::atomic::write_json_atomic;
use crate::bits::BitList;
use crate::distortion::unit_label;
use crate::quant::{Kind, Quantizer, QuantizerSpec};
use crate::{Error, Result};

pub const CALIB_FORMAT: &str = "ratequant-calib";
pub const PLAN_FORMAT: &str = "ratequant-plan";
/// The version of both formats this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// A quantizer design as recorded in a file: its name and its parameters as the design
/// reports them (`Quantizer::params`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizerInfo {
    pub name: String,
    #[serde(default)]
    pub params: serde_json::Value,
}

impl QuantizerInfo {
    pub fn of(quantizer: &dyn Quantizer) -> Self {
        QuantizerInfo {
            name: quantizer.name().to_string(),
            params: quantizer.params(),
        }
    }

    /// The spec that rebuilds this design (`quant::build`): name plus `params.group` when it is
    /// a number (`null` or absent means the design's default).
    pub fn spec(&self) -> Result<QuantizerSpec> {
        let group = match self.params.get("group") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(v.as_u64().filter(|&g| g > 0).ok_or_else(|| {
                Error::invalid(format!(
                    "quantizer `{}`: params.group must be a positive integer or null, got {v}",
                    self.name
                ))
            })? as usize),
        };
        let spec = QuantizerSpec {
            name: self.name.clone(),
            group,
        };
        spec.validate()?;
        Ok(spec)
    }
}

impl std::fmt::Display for QuantizerInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.params.get("group").and_then(|g| g.as_u64()) {
            Some(g) => write!(f, "{} (group {g})", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Which distortion table the model was fitted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DistortionTarget {
    /// Plain mean squared error.
    Mse,
    /// Importance-weighted squared error (needs per-element importance).
    Weighted,
}

/// One β for all units of the design, or one per unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BetaMode {
    Shared,
    PerUnit,
}

/// Where the units' importance weights came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImportanceSource {
    /// None given: every weight is 1.
    None,
    PerUnit,
    PerElement,
}

/// One unit of a CALIB file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibUnit {
    pub layer: usize,
    pub head: usize,
    pub kind: Kind,
    /// Tokens per sequence tile.
    pub tokens: usize,
    pub head_dim: usize,
    /// Elements over all sequences (`sequences × tokens × head_dim`).
    pub elements: u64,
    /// Importance weight `w` in the allocation objective.
    pub importance: f64,
    /// Population variance of the unit's values (the `textbook` policy's α).
    pub variance: f64,
    /// Mean of the squared values (reference of the zero-distortion floor).
    pub mean_square: f64,
    /// The design's metadata bits per element for this tile shape.
    pub metadata_bits: f64,
    /// MSE per measured bit-width.
    pub distortion: Vec<f64>,
    /// Importance-weighted squared error per measured bit-width (per-element importance only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weighted_distortion: Option<Vec<f64>>,
    /// Fitted α (0 when every fit point is at or below the zero-distortion floor).
    pub alpha: f64,
    /// The unit's own β (`beta_mode = per-unit` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    /// R² of this unit's fit (null with fewer than two usable points).
    pub r2: Option<f64>,
    /// Fit bit-widths whose distortion was above the floor and so entered the fit.
    pub fit_points: Vec<u8>,
}

impl CalibUnit {
    pub fn key(&self) -> (usize, usize, Kind) {
        (self.layer, self.head, self.kind)
    }
    pub fn label(&self) -> String {
        unit_label(self.layer, self.head, self.kind)
    }
}

/// A design's measured distortion and fitted model (`CALIB.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calib {
    pub format: String,
    pub version: u32,
    pub quantizer: QuantizerInfo,
    pub measured_bits: BitList,
    pub fit_bits: BitList,
    /// The table the model was fitted to (and `empirical` allocates with).
    pub target: DistortionTarget,
    pub importance: ImportanceSource,
    pub beta_mode: BetaMode,
    /// The design's β: the pooled fit over all units (also recorded in per-unit mode).
    pub beta: f64,
    /// Overall R² (within-unit variation of ln D explained by the model); null if undefined.
    pub r2: Option<f64>,
    /// A fit point is used only if its distortion exceeds `zero_floor × mean_square`.
    pub zero_floor: f64,
    pub sequences: usize,
    /// Sorted by (layer, head, kind), K before V.
    pub units: Vec<CalibUnit>,
}

impl Calib {
    /// The distortion table the fit used (`distortion` or `weighted_distortion`).
    pub fn target_table<'a>(&self, unit: &'a CalibUnit) -> &'a [f64] {
        match (self.target, &unit.weighted_distortion) {
            (DistortionTarget::Weighted, Some(w)) => w,
            _ => &unit.distortion,
        }
    }

    /// β of a unit: its own in per-unit mode, the shared one otherwise.
    pub fn unit_beta(&self, unit: &CalibUnit) -> f64 {
        match self.beta_mode {
            BetaMode::PerUnit => unit.beta.unwrap_or(self.beta),
            BetaMode::Shared => self.beta,
        }
    }

    pub fn total_elements(&self) -> u64 {
        self.units.iter().map(|u| u.elements).sum()
    }

    pub fn load(path: impl AsRef<Path>) -> Result<Calib> {
        let path = path.as_ref();
        let calib: Calib = load_versioned(path, CALIB_FORMAT)?;
        calib.validate().map_err(|msg| Error::file(path, msg))?;
        Ok(calib)
    }

    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.validate().map_err(|msg| {
            Error::file(path, format!("refusing to write an invalid CALIB: {msg}"))
        })?;
        write_json_atomic(path, self)
    }

    /// Checks everything serde cannot: lengths, ranges, order and uniqueness of units.
    pub fn validate(&self) -> std::result::Result<(), String> {
        check_header(&self.format, self.version, CALIB_FORMAT)?;
        if !self.fit_bits.is_subset_of(&self.measured_bits) {
            return Err(format!(
                "fit_bits {} are not all in measured_bits {}",
                self.fit_bits, self.measured_bits
            ));
        }
        if self.fit_bits.len() < 2 {
            return Err(format!(
                "fit_bits {} must have at least two bit-widths",
                self.fit_bits
            ));
        }
        positive_finite("beta", self.beta)?;
        non_negative_finite("zero_floor", self.zero_floor)?;
        if let Some(r2) = self.r2 {
            finite("r2", r2)?;
        }
        if self.sequences == 0 {
            return Err("sequences must be at least 1".into());
        }
        if self.units.is_empty() {
            return Err("units is empty".into());
        }
        let n_bits = self.measured_bits.len();
        for (i, u) in self.units.iter().enumerate() {
            let at = |field: &'static str| UnitField(i, field);
            if i > 0 && self.units[i - 1].key() >= u.key() {
                return Err(format!(
                    "units[{i}]: {} is out of order or repeated (units must be sorted by layer, head, k before v)",
                    u.label()
                ));
            }
            if u.tokens == 0 || u.head_dim == 0 {
                return Err(format!(
                    "{}: tokens and head_dim must be positive",
                    at("tokens")
                ));
            }
            if u.elements == 0 || u.elements % (u.tokens * u.head_dim) as u64 != 0 {
                return Err(format!(
                    "{}: {} is not a positive multiple of tokens × head_dim = {}",
                    at("elements"),
                    u.elements,
                    u.tokens * u.head_dim
                ));
            }
            non_negative_finite(at("importance"), u.importance)?;
            non_negative_finite(at("variance"), u.variance)?;
            non_negative_finite(at("mean_square"), u.mean_square)?;
            non_negative_finite(at("metadata_bits"), u.metadata_bits)?;
            non_negative_finite(at("alpha"), u.alpha)?;
            check_table(at("distortion"), &u.distortion, n_bits)?;
            if let Some(w) = &u.weighted_distortion {
                check_table(at("weighted_distortion"), w, n_bits)?;
            } else if self.target == DistortionTarget::Weighted {
                return Err(format!(
                    "{} is missing but target is \"weighted\"",
                    at("weighted_distortion")
                ));
            }
            match (self.beta_mode, u.beta) {
                (BetaMode::PerUnit, None) => {
                    return Err(format!(
                        "{} is missing but beta_mode is \"per-unit\"",
                        at("beta")
                    ))
                }
                (_, Some(b)) => positive_finite(at("beta"), b)?,
                _ => {}
            }
            if let Some(r2) = u.r2 {
                finite(at("r2"), r2)?;
            }
            if let Some(b) = u.fit_points.iter().find(|&&b| !self.fit_bits.contains(b)) {
                return Err(format!(
                    "{}: {b} is not one of fit_bits {}",
                    at("fit_points"),
                    self.fit_bits
                ));
            }
        }
        Ok(())
    }
}

/// One unit of a PLAN file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanUnit {
    pub layer: usize,
    pub head: usize,
    pub kind: Kind,
    pub elements: u64,
    pub bits: u8,
    /// The continuous optimum for this unit (null when the policy has no continuous model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continuous_bits: Option<f64>,
}

/// The objective `Σ w_i·D_i(b_i)` of the plan and of the uniform allocation at the same budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanObjective {
    /// Which distortion model the numbers use: `fitted` (this calib's model), `textbook`,
    /// `empirical` (this calib's measured table), or `fitted:<design>` for `--distortion-from`.
    pub model: String,
    pub plan: f64,
    /// Null when the uniform allocation is impossible with the allowed bits.
    pub uniform: Option<f64>,
    /// The same two under this calib's measured table (null when a bit-width was not measured).
    pub measured_plan: Option<f64>,
    pub measured_uniform: Option<f64>,
}

/// The continuous (real-valued bits) optimum by reverse water-filling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContinuousSummary {
    /// The Lagrange multiplier μ: every interior unit has `w·α·ln β·β^(−b) / elements = μ`.
    pub water_level: f64,
    pub objective: f64,
    pub mean_bits: f64,
    pub units_at_min: usize,
    pub units_at_max: usize,
    pub units_interior: usize,
}

/// A per-unit bit plan (`PLAN.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub format: String,
    pub version: u32,
    pub quantizer: QuantizerInfo,
    /// `ratequant`, `empirical`, `textbook` or `uniform`.
    pub policy: String,
    /// The design whose model made the plan, when it is not `quantizer` (`--distortion-from`).
    #[serde(default)]
    pub distortion_from: Option<QuantizerInfo>,
    pub allowed_bits: BitList,
    pub requested_mean_bits: f64,
    pub achieved_mean_bits: f64,
    pub total_elements: u64,
    /// ⌊requested × total_elements⌋, the element-bit budget.
    pub requested_element_bits: u64,
    pub achieved_element_bits: u64,
    /// True when the plan uses exactly `requested_mean_bits × total_elements` element-bits.
    pub budget_met: bool,
    /// Code bits plus the design's metadata bits, per element.
    pub effective_bits_per_element: f64,
    /// `greedy`, `dp` or `uniform`: how the integer plan was found (all but `uniform` exact).
    pub method: String,
    pub objective: PlanObjective,
    pub continuous: Option<ContinuousSummary>,
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Sorted by (layer, head, kind), K before V.
    pub units: Vec<PlanUnit>,
}

impl Plan {
    pub fn load(path: impl AsRef<Path>) -> Result<Plan> {
        let path = path.as_ref();
        let plan: Plan = load_versioned(path, PLAN_FORMAT)?;
        plan.validate().map_err(|msg| Error::file(path, msg))?;
        Ok(plan)
    }

    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.validate().map_err(|msg| {
            Error::file(path, format!("refusing to write an invalid PLAN: {msg}"))
        })?;
        write_json_atomic(path, self)
    }

    /// Bits of one unit, `None` if the plan does not cover it.
    pub fn bits(&self, layer: usize, head: usize, kind: Kind) -> Option<u8> {
        self.units
            .binary_search_by_key(&(layer, head, kind), |u| (u.layer, u.head, u.kind))
            .ok()
            .map(|i| self.units[i].bits)
    }

    /// Number of layers the plan covers (its highest layer + 1).
    pub fn num_layers(&self) -> usize {
        self.units.iter().map(|u| u.layer + 1).max().unwrap_or(0)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        check_header(&self.format, self.version, PLAN_FORMAT)?;
        if self.units.is_empty() {
            return Err("units is empty".into());
        }
        finite("requested_mean_bits", self.requested_mean_bits)?;
        finite("achieved_mean_bits", self.achieved_mean_bits)?;
        finite(
            "effective_bits_per_element",
            self.effective_bits_per_element,
        )?;
        let mut total = 0u64;
        let mut element_bits = 0u64;
        for (i, u) in self.units.iter().enumerate() {
            if i > 0 {
                let prev = &self.units[i - 1];
                if (prev.layer, prev.head, prev.kind) >= (u.layer, u.head, u.kind) {
                    return Err(format!(
                        "units[{i}]: {} is out of order or repeated (units must be sorted by layer, head, k before v)",
                        unit_label(u.layer, u.head, u.kind)
                    ));
                }
            }
            if !self.allowed_bits.contains(u.bits) {
                return Err(format!(
                    "units[{i}].bits: {} is not one of allowed_bits {}",
                    u.bits, self.allowed_bits
                ));
            }
            if u.elements == 0 {
                return Err(format!("units[{i}].elements must be positive"));
            }
            total += u.elements;
            element_bits += u.elements * u.bits as u64;
        }
        if total != self.total_elements {
            return Err(format!(
                "total_elements is {}, but the units sum to {total}",
                self.total_elements
            ));
        }
        if element_bits != self.achieved_element_bits {
            return Err(format!(
                "achieved_element_bits is {}, but the units' bits give {element_bits}",
                self.achieved_element_bits
            ));
        }
        Ok(())
    }
}

/// Reads a JSON file, checks its `format` tag and `version`, then deserialises it.
fn load_versioned<T: serde::de::DeserializeOwned>(path: &Path, expected_format: &str) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::file(path, format!("malformed JSON: {e}")))?;
    let obj = value.as_object().ok_or_else(|| {
        Error::file(
            path,
            format!("expected a JSON object (a {expected_format} file)"),
        )
    })?;
    match obj.get("format") {
        Some(serde_json::Value::String(f)) if f == expected_format => {}
        Some(other) => {
            return Err(Error::file(
                path,
                format!("field `format` is {other}, expected \"{expected_format}\""),
            ));
        }
        None => {
            return Err(Error::file(
                path,
                format!("missing field `format` (expected \"{expected_format}\")"),
            ))
        }
    }
    match obj.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == FORMAT_VERSION as u64 => {}
        Some(v) => {
            return Err(Error::file(
                path,
                format!("unsupported {expected_format} version {v} (this build reads version {FORMAT_VERSION})"),
            ));
        }
        None => {
            return Err(Error::file(
                path,
                format!("missing or non-integer field `version` (expected {FORMAT_VERSION})"),
            ));
        }
    }
    // Deserialise from the text (not the Value) so serde's errors carry line and column.
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::file(path, format!("invalid {expected_format}: {e}")))
}

/// `units[i].field`, formatted only when an error message needs it (validation runs on every
/// load and save, over thousands of units).
struct UnitField(usize, &'static str);

impl std::fmt::Display for UnitField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "units[{}].{}", self.0, self.1)
    }
}

fn check_header(format: &str, version: u32, expected: &str) -> std::result::Result<(), String> {
    if format != expected {
        return Err(format!("format is \"{format}\", expected \"{expected}\""));
    }
    if version != FORMAT_VERSION {
        return Err(format!("version is {version}, expected {FORMAT_VERSION}"));
    }
    Ok(())
}

fn finite(field: impl std::fmt::Display, x: f64) -> std::result::Result<(), String> {
    if x.is_finite() {
        Ok(())
    } else {
        Err(format!("{field} must be a finite number, got {x}"))
    }
}

fn non_negative_finite(field: impl std::fmt::Display, x: f64) -> std::result::Result<(), String> {
    if x.is_finite() && x >= 0.0 {
        Ok(())
    } else {
        Err(format!(
            "{field} must be a finite non-negative number, got {x}"
        ))
    }
}

fn positive_finite(field: impl std::fmt::Display, x: f64) -> std::result::Result<(), String> {
    if x.is_finite() && x > 0.0 {
        Ok(())
    } else {
        Err(format!("{field} must be a finite positive number, got {x}"))
    }
}

fn check_table(
    field: impl std::fmt::Display,
    table: &[f64],
    expected_len: usize,
) -> std::result::Result<(), String> {
    if table.len() != expected_len {
        return Err(format!(
            "{field} has {} values, expected one per measured bit-width ({expected_len})",
            table.len()
        ));
    }
    if let Some((i, x)) = table
        .iter()
        .enumerate()
        .find(|(_, x)| !(x.is_finite() && **x >= 0.0))
    {
        return Err(format!(
            "{field}[{i}] must be a finite non-negative number, got {x}"
        ));
    }
    Ok(())
}
