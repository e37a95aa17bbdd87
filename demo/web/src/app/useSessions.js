import { useEffect, useState } from 'react'

// useSessions polls the sessions every second, as the app's hook did: every
// component that uses it has its own timer and sends its own requests.
export function useSessions() {
  const [sessions, setSessions] = useState(null)
  const [requests, setRequests] = useState(0)
  const [error, setError] = useState(null)

  useEffect(() => {
    let live = true
    const load = async () => {
      setRequests((n) => n + 1)
      try {
        const res = await fetch('/api/sessions')
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
