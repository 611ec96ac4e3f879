import WebSocket from 'ws';

export const DEFAULT_CONTROL_PATH = '/run/vhost-xdp/control.sock';

/** Calls one control API method over the unix socket and returns its result. */
export async function callControl(path: string, method: string, params: Record<string, unknown> = {}, timeoutMs = 10_000): Promise<unknown> {
  const ws = new WebSocket(`ws+unix://${path}:/`);
  try {
    await new Promise<void>((resolve, reject) => {
      ws.once('open', () => resolve());
      ws.once('error', (e) => reject(new Error(`cannot reach the control socket ${path}: ${e.message} (is 'vhost-xdp serve --control ${path}' running?)`)));
    });
    const id = 1;
    const answer = new Promise<unknown>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`no answer to ${method} within ${timeoutMs} ms`)), timeoutMs);
      ws.on('message', (data) => {
        clearTimeout(t);
        const msg = JSON.parse(data.toString()) as { id: number; result?: unknown; error?: { code: string; message: string } };
        if (msg.error) reject(Object.assign(new Error(msg.error.message), { code: msg.error.code }));
        else resolve(msg.result);
      });
    });
    ws.send(JSON.stringify({ id, method, params }));
    return await answer;
  } finally {
    ws.close();
  }
}
