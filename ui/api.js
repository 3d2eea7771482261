// The admin API client: the token kept in this tab's sessionStorage, sent as
// a Bearer token; problem+json errors turned into readable ApiErrors.

const TOKEN_KEY = 'keygate.admin_token';

export const session = {
  token: () => sessionStorage.getItem(TOKEN_KEY),
  role: null,
  // Called when the API refuses the token of a signed-in session (401).
  onUnauthorized: () => {},
  signIn(token) {
    sessionStorage.setItem(TOKEN_KEY, token);
  },
  signOut() {
    sessionStorage.removeItem(TOKEN_KEY);
    session.role = null;
  },
  canWrite: () => session.role === 'admin' || session.role === 'developer',
  isAdmin: () => session.role === 'admin',
};

// An error answer of the admin API (RFC 9457 problem+json), or a network error
// (status 0).
export class ApiError extends Error {
  constructor(status, problem) {
    const p = problem && typeof problem === 'object' ? problem : {};
    const title = p.title || `HTTP ${status}`;
    const detail = p.detail && p.detail !== title ? `: ${p.detail}` : '';
    const code = p.code ? ` (${p.code})` : '';
    const id = p.request_id ? ` Request id ${p.request_id}.` : '';
    super(`${title}${detail}${code}.${id}`);
    this.status = status;
    this.code = p.code || null;
  }
}

// Calls the admin API; resolves with the parsed JSON (null for 204).
export async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  const token = session.token();
  if (token) headers.Authorization = `Bearer ${token}`;
  const init = { method, headers, cache: 'no-store', credentials: 'omit' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, { title: 'The admin API did not answer', detail: e.message });
  }
  if (resp.status === 204) return null;
  const type = resp.headers.get('Content-Type') || '';
  const data = type.includes('json') ? await resp.json().catch(() => null) : null;
  if (!resp.ok) {
    const err = new ApiError(resp.status, data);
    // Once signed in, a refused token ends the session (sign-in handles its own).
    if (resp.status === 401 && session.role) session.onUnauthorized(err);
    throw err;
  }
  return data;
}

// `path?name=value&...` without the empty parameters.
export function withQuery(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== null && v !== undefined && v !== '') q.set(k, v);
  }
  const text = q.toString();
  return text ? `${path}?${text}` : path;
}

// Finds the role of the signed-in token. The API has no "who am I" call, so
// the console asks two questions that change nothing: PATCH /v1/settings with
// an empty body is allowed to admins only, and a bulk call on no ids to admins
// and developers; auditors may only read.
export async function probeRole() {
  await api('GET', '/v1/settings');
  if (await allowed('PATCH', '/v1/settings', {})) return 'admin';
  if (await allowed('POST', '/v1/keys/bulk', { action: 'suspend', ids: [] })) return 'developer';
  return 'auditor';
}

async function allowed(method, path, body) {
  try {
    await api(method, path, body);
    return true;
  } catch (e) {
    if (e.status === 403 && e.code === 'forbidden_role') return false;
    throw e;
  }
}
