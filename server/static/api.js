// Talking to the server: the API key (session storage, X-API-Key header only), JSON
// calls, uploads with progress, downloads, and the server's errors in words.

const KEY_ITEM = "fingerprint.apiKey";

export function getKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

export function setKey(key) {
  sessionStorage.setItem(KEY_ITEM, key);
}

export function clearKey() {
  sessionStorage.removeItem(KEY_ITEM);
}

/** An answer of the server that is not a success, with its message in words. */
export class ApiError extends Error {
  constructor(status, detail, field) {
    super(explain(status, detail));
    this.status = status;
    this.detail = detail;
    this.field = field || null;
  }
}

const WORDS = {
  0: "The server could not be reached. Check the network connection and that the server is running.",
  400: "The request was malformed.",
  401: "This API key is not valid, or it has been revoked. Check it, or ask the lab's admin for a new one.",
  403: "This needs an admin API key.",
  404: "Not found (it may have been deleted, or belong to another key).",
  409: "Not possible in the current state.",
  410: "The files are gone from the server.",
  413: "The upload is too large for this server.",
  415: "The server expected a form upload.",
  422: "The server refused the input.",
  429: "Too many jobs for this key are queued or running. Wait for one to finish.",
  503: "The server is not ready. Try again in a moment.",
};

/** A sentence for an HTTP status and the server's detail message. */
export function explain(status, detail) {
  const words = WORDS[status] || (status >= 500 ? "The server failed on this request." : `The server answered ${status}.`);
  if (!detail || status === 401) return words;
  return `${words} ${detail}`;
}

async function errorFrom(response) {
  let detail = null;
  let field = null;
  try {
    const body = await response.json();
    detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    field = body.field || null;
  } catch (_) {
    detail = null;
  }
  return new ApiError(response.status, detail, field);
}

/** Listeners told when the key is refused (401): the page signs out. */
const unauthorisedListeners = [];
export function onUnauthorised(listener) {
  unauthorisedListeners.push(listener);
}

function refused(error) {
  if (error.status === 401) unauthorisedListeners.forEach((f) => f(error));
}

/** fetch() with the key; throws ApiError on a non-2xx answer. */
export async function call(method, path, { body = null, json = null, key = null } = {}) {
  const headers = { "X-API-Key": key || getKey() || "" };
  let payload = body;
  if (json !== null) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body: payload, cache: "no-store", credentials: "omit" });
  } catch (_) {
    throw new ApiError(0, null);
  }
  if (!response.ok) {
    const error = await errorFrom(response);
    if (!key) refused(error);
    throw error;
  }
  return response;
}

export async function getJSON(path, options) {
  return (await call("GET", path, options)).json();
}

/** POST a FormData with upload progress (XMLHttpRequest: fetch has none).
 * Returns { promise, abort }; onProgress(loaded, total) is called while sending. */
export function upload(path, form, onProgress) {
  const xhr = new XMLHttpRequest();
  const promise = new Promise((resolve, reject) => {
    xhr.open("POST", path);
    xhr.setRequestHeader("X-API-Key", getKey() || "");
    xhr.responseType = "json";
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded, event.total);
    });
    xhr.addEventListener("load", () => {
      const body = xhr.response || {};
      if (xhr.status >= 200 && xhr.status < 300) {
        resolve(body);
      } else {
        const error = new ApiError(xhr.status, typeof body.detail === "string" ? body.detail : null, body.field);
        refused(error);
        reject(error);
      }
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, null)));
    xhr.addEventListener("abort", () => reject(new ApiError(-1, "upload stopped")));
    xhr.send(form);
  });
  return { promise, abort: () => xhr.abort() };
}

/** Download a file through fetch (the key stays in the header, never in a URL) and
 * hand it to the browser under `name`. */
export async function download(path, name) {
  const response = await call("GET", path);
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  link.rel = "noopener";
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return blob.size;
}
