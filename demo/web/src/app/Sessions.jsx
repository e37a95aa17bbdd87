import { digest } from './digest.js'
import { useSessions } from './useSessions.js'
import { useSessionStream } from './useSessionStream.js'

function SessionsCard({ n }) {
  const { sessions, requests, error } = useSessions()
  const list = sessions?.data.sessions ?? []
  return (
    <article
      className={`card poller${error ? ' failed' : ''}`}
      data-kind="poller"
      data-requests={requests}
      data-digest={sessions ? digest(sessions.text) : ''}
      data-error={error ?? ''}
    >
      <header>
        <span className="card-title">Sessions #{n}</span>
        <span className="badge">{requests} requests</span>
      </header>
      {sessions ? (
        <>
          <p className="big">{sessions.data.count} sessions</p>
          <ul className="users">
            {list.slice(0, 3).map((s) => (
              <li key={s.id}>
                {s.user} <span className="muted">{s.device}</span>
              </li>
            ))}
          </ul>
          <p className="muted small">data {digest(sessions.text)}</p>
        </>
      ) : (
        <p className="muted">loading…</p>
      )}
      {error && <p className="error small">{error}</p>}
    </article>
  )
}

function StreamCard({ n }) {
  const { connections, events, gaps, last, open } = useSessionStream()
  return (
    <article
      className={`card stream${open ? '' : ' failed'}`}
      data-kind="stream"
      data-connections={connections}
      data-events={events}
      data-gaps={gaps}
      data-last-id={last?.id ?? ''}
      data-digest={last ? digest(last.text) : ''}
    >
      <header>
        <span className="card-title">Live #{n}</span>
        <span className="badge">
          {connections} {connections === 1 ? 'connection' : 'connections'}
        </span>
      </header>
      {last ? (
        <>
          <p className="big">{last.data.active} active</p>
          <p className="small">
            latest {last.data.latest} <span className="muted">at {last.data.time.slice(11, 19)}</span>
          </p>
          <p className="muted small">
            event {last.id} · {events} received{gaps > 0 ? ` · ${gaps} gaps` : ''}
          </p>
        </>
      ) : (
        <p className="muted">{open ? 'waiting for an event…' : 'connecting…'}</p>
      )}
    </article>
  )
}

// Sessions is the app: components written the naive way, each with its own
// polling timer or its own EventSource.
export default function Sessions({ pollers, streams }) {
  return (
    <section className="app">
      <h2>
        The app <span className="muted small">{pollers} polling components, {streams} streaming</span>
      </h2>
      <div className="grid">
        {Array.from({ length: pollers }, (_, i) => (
          <SessionsCard key={`p${i}`} n={i + 1} />
        ))}
        {Array.from({ length: streams }, (_, i) => (
          <StreamCard key={`s${i}`} n={i + 1} />
        ))}
      </div>
    </section>
  )
}
