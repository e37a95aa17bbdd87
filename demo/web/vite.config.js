import { defineConfig } from 'vite'
import react from '@vitejs/plugin-react'

// `npm run dev` serves the page with hot reload on :5173 and sends the API
// and the panel's routes to the demo's Caddy (./demo.sh, on :8080).
const caddy = process.env.DEMO_CADDY || 'http://localhost:8080'

export default defineConfig({
  plugins: [react()],
  server: {
    proxy: {
      '/api': caddy,
      '/coalesce': caddy,
      '/upstream': caddy,
    },
  },
})
