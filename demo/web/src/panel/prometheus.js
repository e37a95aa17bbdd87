// sumMetric adds up every series of a metric in Prometheus' text format,
// keeping those whose labels include every pair in match. It returns null
// when the metric is not there at all.
export function sumMetric(text, name, match = {}) {
  let sum = null
  for (const line of text.split('\n')) {
    if (!line.startsWith(name)) continue
    const rest = line.slice(name.length)
    let labels = ''
    let value
    if (rest.startsWith('{')) {
      const end = rest.lastIndexOf('}')
      labels = rest.slice(1, end)
      value = rest.slice(end + 1)
    } else if (rest.startsWith(' ')) {
      value = rest
    } else {
      continue // another metric whose name starts with this one
    }
    if (!Object.entries(match).every(([k, v]) => labels.includes(`${k}="${v}"`))) continue
    const n = Number(value.trim().split(' ')[0])
    if (Number.isFinite(n)) sum = (sum ?? 0) + n
  }
  return sum
}
