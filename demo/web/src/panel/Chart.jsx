// Chart plots requests reaching Caddy's coalesce handler and the calls it
// passed upstream, per second, over the last minute; seconds with the kill
// switch on are shaded.
export default function Chart({ history }) {
  const width = 360
  const height = 120
  const pad = { top: 8, right: 8, bottom: 16, left: 30 }
  const slots = 60
  const top = Math.max(5, ...history.flatMap((h) => [h.requests ?? 0, h.upstream ?? 0]))
  const scale = niceCeiling(top)
  const x = (i) => pad.left + ((width - pad.left - pad.right) * (slots - history.length + i)) / (slots - 1)
  const y = (v) => pad.top + (height - pad.top - pad.bottom) * (1 - v / scale)
  const line = (field) =>
    history
      .map((h, i) => (h[field] == null ? null : `${x(i).toFixed(1)},${y(h[field]).toFixed(1)}`))
      .filter(Boolean)
      .join(' ')
  const step = (width - pad.left - pad.right) / (slots - 1)
  return (
    <svg className="chart" viewBox={`0 0 ${width} ${height}`} role="img" aria-label="requests and upstream calls per second">
      {history.map((h, i) =>
        h.bypass ? (
          <rect key={i} className="chart-bypass" x={x(i) - step / 2} y={pad.top} width={step} height={height - pad.top - pad.bottom} />
        ) : null,
      )}
      {[0, scale / 2, scale].map((v) => (
        <g key={v}>
          <line className="chart-grid" x1={pad.left} x2={width - pad.right} y1={y(v)} y2={y(v)} />
          <text className="chart-label" x={pad.left - 4} y={y(v) + 3} textAnchor="end">
            {v}
          </text>
        </g>
      ))}
      <text className="chart-label" x={pad.left} y={height - 3}>
        −60 s
      </text>
      <text className="chart-label" x={width - pad.right} y={height - 3} textAnchor="end">
        now
      </text>
      <polyline className="chart-requests" points={line('requests')} />
      <polyline className="chart-upstream" points={line('upstream')} />
    </svg>
  )
}

function niceCeiling(v) {
  const p = 10 ** Math.floor(Math.log10(v))
  for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p
  return 10 * p
}
