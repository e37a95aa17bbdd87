import { useEffect, useState } from 'react'

// useSessionStream opens its own EventSource, as the app's hook did: every
// component that uses it holds one connection.
export function useSessionStream() {
  const [state, setState] = useState({ connections: 0, events: 0, gaps: 0, last: null, open: false })

  useEffect(() => {
    const source = new EventSource('/api/sessions/stream')
    source.onopen = () => setState((s) => ({ ...s, connections: s.connections + 1, open: true }))
    source.onerror = () => setState((s) => ({ ...s, open: false }))
    source.onmessage = (e) => {
      const id = Number(e.lastEventId)
      setState((s) => ({
        ...s,
        events: s.events + 1,
        // An event that does not follow the previous one is a gap.
        gaps: s.gaps + (s.last && id !== s.last.id + 1 ? 1 : 0),
        last: { id, text: e.data, data: JSON.parse(e.data) },
      }))
    }
    return () => source.close()
  }, [])

  return state
}
