import { useState } from 'react'
import Chart from './Chart.jsx'
import { setBypass, usePanelData } from './usePanelData.js'

const fmt = (v, digits = 0) => (v == null ? '—' : v.toFixed(digits))

function duration(ns) {
  if (ns == null) return '—'
  if (ns < 1e6) return `${(ns / 1e3).toFixed(0)} µs`
  if (ns < 1e9) return `${(ns / 1e6).toFixed(1)} ms`
  return `${(ns / 1e9).toFixed(2)} s`
}

function Tile({ label, value, note, id, tone }) {
  return (
    <div className={`tile${tone ? ` ${tone}` : ''}`} data-stat={id}>
      <div className="tile-value">{value}</div>
      <div className="tile-label">{label}</div>
      {note && <div className="tile-note">{note}</div>}
    </div>
  )
}

function Row({ label, value, id }) {
  return (
    <div className="row" data-stat={id}>
      <span>{label}</span>
      <span className="row-value">{value}</span>
    </div>
  )
}

// streamCounts reads /coalesce/streams: its totals, or else its list.
function streamCounts(body) {
  const list = Array.isArray(body) ? body : Array.isArray(body?.streams) ? body.streams : []
  return {
    open: body?.total ?? list.length,
    subscribers: body?.subscribers ?? list.reduce((n, s) => n + (s.subscribers ?? 0), 0),
  }
}

// LivePanel shows what caddy-coalesce does with the page's traffic, from the
// routes the demo's Caddyfile opens on the site, and flips the kill switch.
export default function LivePanel() {
  const { data, refresh } = usePanelData()
  const [switching, setSwitching] = useState(false)
  const [switchError, setSwitchError] = useState(null)
  const { stats, breakers, streams, top, upstream, rates, history } = data
  const registry = stats?.total?.registry
  const bypass = stats?.bypass?.enabled
  const streamsMissing = streams?.missing
  const fanout = streams?.body ? streamCounts(streams.body) : null
  const subscribers = fanout?.subscribers ?? stats?.total?.streams?.subscribers
  // A hook is a client attached to the registry now: a flight's leader or
  // follower, or a stream's subscriber.
  const hooks =
    registry?.active_hooks ?? (registry ? registry.active_keys + registry.waiters + (subscribers ?? 0) : null)
  const up = upstream?.body

  const flip = async () => {
    setSwitching(true)
    setSwitchError(null)
    try {
      await setBypass(!bypass)
      await refresh()
    } catch (err) {
      setSwitchError(err.message)
    } finally {
      setSwitching(false)
    }
  }

  return (
    <aside className="panel" aria-label="live panel">
      <div className="panel-head">
        <h2>Live panel</h2>
        <button
          type="button"
          className={`switch ${bypass == null ? 'unknown' : bypass ? 'off' : 'on'}`}
          role="switch"
          aria-checked={bypass === false}
          disabled={bypass == null || switching}
          onClick={flip}
          data-testid="collapsing-switch"
          title="POST /coalesce/bypass: the kill switch"
        >
          <span className="switch-knob" />
          <span className="switch-text">{bypass == null ? 'collapsing ?' : bypass ? 'collapsing off' : 'collapsing on'}</span>
        </button>
      </div>
      {switchError && <p className="error small">{switchError}</p>}

      <div className="tiles">
        <Tile id="requests-rate" label="requests / s to Caddy" value={fmt(rates?.requests, 1)} />
        <Tile id="upstream-rate" label="upstream calls / s" value={fmt(rates?.upstream, 1)} tone={bypass ? 'hot' : 'cool'} />
        <Tile id="hits-rate" label="micro-cache hits / s" value={fmt(rates?.hits, 1)} />
        <Tile
          id="upstream-count"
          label="GET /api/sessions at the API"
          value={up ? up.requests?.['/api/sessions'] ?? '—' : '—'}
          note={upstream?.missing ? 'the API has no /stats' : 'its own counter'}
        />
      </div>

      <div className="chart-box">
        <div className="legend">
          <span className="key requests" /> requests / s <span className="key upstream" /> upstream calls / s
          <span className="key bypass" /> collapsing off
        </div>
        <Chart history={history} />
      </div>

      <div className="columns">
        <section>
          <h3>Registry</h3>
          <Row id="active-keys" label="active keys" value={registry?.active_keys ?? '—'} />
          <Row id="active-hooks" label="active hooks" value={hooks ?? '—'} />
          <Row id="waiters" label="waiters" value={registry?.waiters ?? '—'} />
          <Row id="collapsed" label="collapsed" value={registry?.collapsed ?? '—'} />
          <Row id="rejected" label="rejected" value={registry?.rejected ?? '—'} />
          <Row id="flights" label="flights" value={registry?.flights ?? '—'} />
          <Row id="avg-lifetime" label="average lifetime" value={duration(registry?.average_lifetime_ns)} />
        </section>
        <section>
          <h3>Streams</h3>
          {streamsMissing ? (
            <p className="muted small" data-stat="streams-missing">
              no stream fan-out in this Caddy: every EventSource is its own upstream stream
            </p>
          ) : (
            <>
              <Row id="open-streams" label="open streams" value={fanout?.open ?? '—'} />
              <Row id="subscribers" label="subscribers" value={subscribers ?? '—'} />
            </>
          )}
          <Row id="upstream-streams" label="streams at the API" value={up?.streams?.open ?? '—'} />
          <h3>Breakers</h3>
          {breakers?.length ? (
            breakers.map((b) => (
              <div className="row" key={`${b.upstream}-${b.settings ?? ''}`} data-stat="breaker">
                <span className="mono">{b.upstream}</span>
                <span className={`state ${b.state}`}>{b.state}</span>
              </div>
            ))
          ) : (
            <p className="muted small">{breakers ? 'no upstream asked yet' : '—'}</p>
          )}
        </section>
      </div>

      <section>
        <h3>Keys asked for most</h3>
        {top?.length ? (
          top.map((k) => (
            <div className="row" key={`${k.zone}-${k.method}-${k.host}-${k.path}`} data-stat="top-key">
              <span className="mono">
                {k.method} {k.host}
                {k.path}
              </span>
              <span className="row-value">
                {Math.round(k.requests_per_minute)}/min, {Math.round(k.upstream_per_minute)} upstream,{' '}
                {k.identities} {k.identities === 1 ? 'identity' : 'identities'}
              </span>
            </div>
          ))
        ) : (
          <p className="muted small">{top ? 'no requests yet' : '—'}</p>
        )}
      </section>

      <footer className="panel-foot muted small">
        {data.updated ? `updated ${data.updated.toLocaleTimeString()}` : 'loading…'}
        {data.errors?.length ? <span className="error"> · {data.errors.join('; ')}</span> : null}
      </footer>
    </aside>
  )
}
