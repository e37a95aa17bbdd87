import Sessions from './app/Sessions.jsx'
import LivePanel from './panel/LivePanel.jsx'

// ?pollers=N&streams=N change how many components the page renders.
function count(name, fallback) {
  const param = new URLSearchParams(window.location.search).get(name)
  const v = Number(param)
  return param !== null && param !== '' && Number.isInteger(v) && v >= 0 && v <= 100 ? v : fallback
}

export default function App() {
  const pollers = count('pollers', 12)
  const streams = count('streams', 4)
  return (
    <div className="page">
      <header className="page-header">
        <h1>caddy-coalesce demo</h1>
        <p>
          {pollers} components each poll <code>GET /api/sessions</code> every second, and {streams} each
          hold their own <code>EventSource</code>: the naive way. Open more tabs, and flip the switch to see what
          reaches the API.
        </p>
      </header>
      <main className="page-body">
        <Sessions pollers={pollers} streams={streams} />
        <LivePanel />
      </main>
    </div>
  )
}
