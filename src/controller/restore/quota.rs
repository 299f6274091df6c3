//! Whether a namespace's ResourceQuotas admit the claims a restore would create, from each
//! quota's `status.hard` and `status.used` (what the API server's quota admission compares
//! against). Pure: checked before any disk is touched, so an over-quota restore fails at once
//! instead of half-way.

use k8s_openapi::api::core::v1::ResourceQuota;
use kube::ResourceExt;

/// A claim the restore would create: its StorageClass and its request in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewClaim {
    pub storage_class: String,
    pub request_bytes: u128,
}

/// The first quota the new claims would exceed, in words: which quota, which resource, how much
/// is used, what the restore needs and the limit.
pub fn check(quotas: &[ResourceQuota], claims: &[NewClaim]) -> Result<(), String> {
    if claims.is_empty() {
        return Ok(());
    }
    let count = claims.len() as u128;
    let bytes: u128 = claims.iter().map(|c| c.request_bytes).sum();
    let mut needs: Vec<(String, u128)> = vec![
        ("persistentvolumeclaims".into(), count),
        ("requests.storage".into(), bytes),
    ];
    let mut classes: Vec<&str> = claims.iter().map(|c| c.storage_class.as_str()).collect();
    classes.sort();
    classes.dedup();
    for class in classes {
        let of_class: Vec<&NewClaim> = claims.iter().filter(|c| c.storage_class == class).collect();
        needs.push((
            format!("{class}.storageclass.storage.k8s.io/persistentvolumeclaims"),
            of_class.len() as u128,
        ));
        needs.push((
            format!("{class}.storageclass.storage.k8s.io/requests.storage"),
            of_class.iter().map(|c| c.request_bytes).sum(),
        ));
    }
    for quota in quotas {
        let status = quota.status.as_ref();
        let hard = status
            .and_then(|s| s.hard.as_ref())
            .or_else(|| quota.spec.as_ref().and_then(|s| s.hard.as_ref()));
        let Some(hard) = hard else { continue };
        let used = status.and_then(|s| s.used.as_ref());
        for (resource, need) in &needs {
            let Some(limit) = hard.get(resource).and_then(|q| parse_quantity(&q.0)) else {
                continue;
            };
            let in_use = used
                .and_then(|u| u.get(resource))
                .and_then(|q| parse_quantity(&q.0))
                .unwrap_or(0);
            if in_use + need > limit {
                return Err(format!(
                    "ResourceQuota {} would be exceeded: {resource} used {in_use}, the restore needs {need} more, limit {limit}; raise the quota or restore fewer members (spec.newClaims.claims)",
                    quota.name_any()
                ));
            }
        }
    }
    Ok(())
}

/// A Kubernetes quantity as a whole number of units, rounded up (`1Gi`, `500M`, `1.5Gi`, `2e3`,
/// `100m` → 1). None for what is not a quantity.
pub fn parse_quantity(text: &str) -> Option<u128> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    if number.starts_with('-') {
        return None;
    }
    let number = number.trim_start_matches('+');
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    if !whole.bytes().all(|b| b.is_ascii_digit()) || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // The value as digits / 10^scale.
    let digits: u128 = format!("{whole}{fraction}").parse().ok()?;
    let mut scale = fraction.len() as i32;
    let (multiplier, exp10): (u128, i32) = match suffix {
        "" => (1, 0),
        "Ki" => (1 << 10, 0),
        "Mi" => (1 << 20, 0),
        "Gi" => (1 << 30, 0),
        "Ti" => (1 << 40, 0),
        "Pi" => (1 << 50, 0),
        "Ei" => (1 << 60, 0),
        "n" => (1, -9),
        "u" => (1, -6),
        "m" => (1, -3),
        "k" => (1, 3),
        "M" => (1, 6),
        "G" => (1, 9),
        "T" => (1, 12),
        "P" => (1, 15),
        "E" => (1, 18),
        s if s.starts_with(['e', 'E']) => (1, s[1..].parse().ok()?),
        _ => return None,
    };
    scale -= exp10;
    let value = digits.checked_mul(multiplier)?;
    if scale <= 0 {
        value.checked_mul(10u128.checked_pow(u32::try_from(-scale).ok()?)?)
    } else {
        let divisor = 10u128.checked_pow(u32::try_from(scale).ok()?)?;
        Some(value.div_ceil(divisor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn quantities_parse_to_whole_units_rounded_up() {
        for (text, want) in [
            ("1Gi", Some(1u128 << 30)),
            ("64Mi", Some(64 << 20)),
            ("1.5Gi", Some(3 << 29)),
            ("500M", Some(500_000_000)),
            ("2e3", Some(2000)),
            ("100m", Some(1)),
            ("3", Some(3)),
            ("0", Some(0)),
            ("", None),
            ("-1", None),
            ("1Qi", None),
            ("Gi", None),
        ] {
            assert_eq!(parse_quantity(text), want, "{text}");
        }
    }

    fn quota(name: &str, hard: serde_json::Value, used: serde_json::Value) -> ResourceQuota {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"hard": hard},
            "status": {"hard": hard, "used": used},
        }))
        .expect("quota")
    }

    fn claims(n: usize, class: &str, bytes: u128) -> Vec<NewClaim> {
        (0..n)
            .map(|_| NewClaim {
                storage_class: class.into(),
                request_bytes: bytes,
            })
            .collect()
    }

    #[test]
    fn every_kind_of_claim_quota_is_checked_against_what_is_used() {
        let gi = 1u128 << 30;
        let class = "tandem-restore.storageclass.storage.k8s.io";
        let cases = [
            // (hard, used, claims, admitted)
            (
                json!({"persistentvolumeclaims": "3"}),
                json!({"persistentvolumeclaims": "1"}),
                2,
                true,
            ),
            (
                json!({"persistentvolumeclaims": "3"}),
                json!({"persistentvolumeclaims": "2"}),
                2,
                false,
            ),
            (
                json!({"requests.storage": "2Gi"}),
                json!({"requests.storage": "0"}),
                2,
                true,
            ),
            (
                json!({"requests.storage": "2Gi"}),
                json!({"requests.storage": "1"}),
                2,
                false,
            ),
            (
                json!({format!("{class}/requests.storage"): "1Gi"}),
                json!({}),
                2,
                false,
            ),
            (
                json!({format!("{class}/persistentvolumeclaims"): "2"}),
                json!({}),
                2,
                true,
            ),
            (
                json!({format!("{class}/persistentvolumeclaims"): "1"}),
                json!({}),
                2,
                false,
            ),
            // Another class's quota does not apply.
            (
                json!({"other.storageclass.storage.k8s.io/persistentvolumeclaims": "0"}),
                json!({}),
                2,
                true,
            ),
            // Quotas of other things do not apply.
            (
                json!({"count/groupsnapshots.tandem.dev": "0"}),
                json!({}),
                2,
                true,
            ),
        ];
        for (hard, used, n, admitted) in cases {
            let q = quota("q", hard.clone(), used.clone());
            let result = check(&[q], &claims(n, "tandem-restore", gi));
            assert_eq!(result.is_ok(), admitted, "{hard} {used}: {result:?}");
            if let Err(message) = result {
                assert!(message.contains("ResourceQuota q"), "{message}");
            }
        }
        assert!(
            check(
                &[quota(
                    "q",
                    json!({"persistentvolumeclaims": "0"}),
                    json!({})
                )],
                &[]
            )
            .is_ok()
        );
    }
}
