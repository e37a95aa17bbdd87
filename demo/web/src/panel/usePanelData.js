import { useCallback, useEffect, useRef, useState } from 'react'
import { sumMetric } from './prometheus.js'

// The routes the demo's Caddyfile serves for this panel: a read-only window
// on Caddy's admin API (plus the kill switch), and the demo API's counters.
export const routes = {
  stats: '/coalesce/stats',
  breakers: '/coalesce/breakers',
  streams: '/coalesce/streams',
  top: '/coalesce/top?limit=5',
  metrics: '/coalesce/metrics',
  bypass: '/coalesce/bypass',
  upstream: '/upstream/stats',
}

const historyLength = 60

async function getJSON(url) {
  const res = await fetch(url, { cache: 'no-store' })
  if (res.status === 404) return { missing: true }
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`)
  return { body: await res.json() }
}

async function getText(url) {
  const res = await fetch(url, { cache: 'no-store' })
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`)
  return res.text()
}

// counters reads the module's counters from its Prometheus metrics.
function counters(text) {
  return {
    requests: sumMetric(text, 'caddy_coalesce_requests_total'),
    hits: sumMetric(text, 'caddy_coalesce_requests_total', { outcome: 'hit' }),
    upstream: sumMetric(text, 'caddy_coalesce_upstream_requests_total'),
  }
}

function rate(now, before, field, seconds) {
  if (!before || now[field] == null || before[field] == null) return null
  const d = now[field] - before[field]
  return d < 0 ? null : d / seconds // a smaller counter: Caddy restarted
}

// usePanelData refreshes everything the panel shows every second. An
// endpoint that answers 404 (no /coalesce/streams in a Caddy built without
// stream fan-out; no /stats on an API other than the demo's) is marked
// missing and not asked again.
export function usePanelData() {
  const [data, setData] = useState({ history: [] })
  const missing = useRef({})
  const previous = useRef(null)

  const refresh = useCallback(async () => {
    const optional = (name) =>
      missing.current[name]
        ? Promise.resolve({ missing: true })
        : getJSON(routes[name]).then((r) => {
            if (r.missing) missing.current[name] = true
            return r
          })
    const [stats, breakers, streams, top, metrics, upstream] = await Promise.allSettled([
      getJSON(routes.stats),
      getJSON(routes.breakers),
      optional('streams'),
      optional('top'),
      getText(routes.metrics),
      optional('upstream'),
    ])
    const now = { t: performance.now() }
    const errors = []
    const value = (r) => {
      if (r.status === 'fulfilled') return r.value
      errors.push(r.reason.message)
      return null
    }
    const next = {
      stats: value(stats)?.body,
      breakers: value(breakers)?.body?.breakers,
      streams: value(streams),
      top: value(top)?.body?.keys,
      upstream: value(upstream),
      errors,
    }
    const text = value(metrics)
    if (text != null) Object.assign(now, counters(text))
    const before = previous.current
    const seconds = before ? (now.t - before.t) / 1000 : 0
    next.rates = {
      requests: rate(now, before, 'requests', seconds),
      hits: rate(now, before, 'hits', seconds),
      upstream: rate(now, before, 'upstream', seconds),
    }
    previous.current = now
    setData((d) => ({
      ...next,
      history: before
        ? [...d.history, { ...next.rates, bypass: next.stats?.bypass?.enabled }].slice(-historyLength)
        : d.history,
      updated: new Date(),
    }))
  }, [])

  useEffect(() => {
    let live = true
    let timer
    // Every second, from the start of one refresh to the next.
    const tick = async () => {
      const start = performance.now()
      await refresh()
      if (live) timer = setTimeout(tick, Math.max(0, 1000 - (performance.now() - start)))
    }
    tick()
    return () => {
      live = false
      clearTimeout(timer)
    }
  }, [refresh])

  return { data, refresh }
}

// setBypass flips the kill switch: true passes every request straight through.
export async function setBypass(enabled) {
  const res = await fetch(routes.bypass, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ enabled }),
  })
  if (!res.ok) throw new Error(`${routes.bypass}: HTTP ${res.status} ${await res.text()}`)
  return res.json()
}
