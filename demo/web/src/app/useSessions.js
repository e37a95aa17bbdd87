import { useEffect, useState } from 'react'

// useSessions polls the sessions every second, as the app's hook did: every
// component that uses it has its own timer and sends its own requests, past
// the browser's HTTP cache so that a poll never shows an old answer. (Through
// the cache, Chromium holds back identical requests of a tab while the first
// is answered: it answers them itself, or, for an answer it may not store,
// sends them one after another.)
export function useSessions() {
  const [sessions, setSessions] = useState(null)
  const [requests, setRequests] = useState(0)
  const [error, setError] = useState(null)

  useEffect(() => {
    let live = true
    const load = async () => {
      setRequests((n) => n + 1)
      try {
        const res = await fetch('/api/sessions', { cache: 'no-store' })
        if (!res.ok) throw new Error(`HTTP ${res.status}`)
        const text = await res.text()
        if (live) {
          setSessions({ text, data: JSON.parse(text) })
          setError(null)
        }
      } catch (err) {
        if (live) setError(err.message)
      }
    }
    load()
    const timer = setInterval(load, 1000)
    return () => {
      live = false
      clearInterval(timer)
    }
  }, [])

  return { sessions, requests, error }
}
