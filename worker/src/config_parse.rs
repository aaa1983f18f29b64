//! Parsing of the command-line values Dask users type.

use rdask_transport::protocol::Resource;

/// `--memory-limit`: "auto" (system memory / nworkers), "0" (no limit), a byte
/// count ("4GiB", "500MB", "1e9") or a fraction of system memory ("0.5").
pub fn parse_memory_limit(text: &str, nworkers: u32) -> Result<u64, String> {
    let t = text.trim();
    let total = system_memory().unwrap_or(0);
    if t.eq_ignore_ascii_case("auto") {
        return Ok(total / nworkers.max(1) as u64);
    }
    if let Ok(f) = t.parse::<f64>() {
        if f > 0.0 && f <= 1.0 && t.contains('.') {
            return Ok((total as f64 * f) as u64);
        }
        if f >= 0.0 {
            return Ok(f as u64);
        }
    }
    parse_bytes(t)
}

/// "4GiB", "4 GB", "512k", "100" → bytes.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e' || c == 'E')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("cannot parse {text:?} as a size"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024f64.powi(4),
        other => return Err(format!("unknown size unit {other:?} in {text:?}")),
    };
    if n < 0.0 {
        return Err(format!("negative size {text:?}"));
    }
    Ok((n * mult) as u64)
}

/// `--resources "GPU=2 MEM=10e9"` (spaces or commas between entries).
pub fn parse_resources(text: &str) -> Result<Vec<Resource>, String> {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|item| {
            let (name, amount) = item.split_once('=').ok_or_else(|| format!("resource {item:?} must look like NAME=AMOUNT"))?;
            let amount: f64 = amount.parse().map_err(|_| format!("resource amount {amount:?} is not a number"))?;
            Ok(Resource { name: name.to_string(), amount })
        })
        .collect()
}

fn system_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_dask_users_write_them() {
        assert_eq!(parse_bytes("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_bytes("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_bytes("1e9").unwrap(), 1_000_000_000);
        assert_eq!(parse_memory_limit("0", 2).unwrap(), 0);
        let total = system_memory().unwrap();
        assert_eq!(parse_memory_limit("auto", 2).unwrap(), total / 2);
        assert_eq!(parse_memory_limit("0.5", 1).unwrap(), total / 2);
        assert!(parse_bytes("12 parsecs").unwrap_err().contains("unknown size unit"));
    }

    #[test]
    fn resources() {
        let r = parse_resources("GPU=2, MEM=10e9").unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].name, "GPU");
        assert_eq!(r[1].amount, 10e9);
        assert!(parse_resources("GPU").is_err());
    }
}
